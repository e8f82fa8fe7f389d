"""Naming against hand-computed answers, the vocabulary file and the label config's checks."""

import math

import pytest
import torch

from vlsae_ray.config import ConfigError, LabelConfig, parse_config
from vlsae_ray.interpret.naming import load_vocabulary, name_latents, top_image_directions


def test_names_runner_up_and_confidence_by_hand():
    g = torch.Generator().manual_seed(0)
    concepts_vd = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    vocabulary = ["v0", "v1", "v2", "v3", "v4"]
    directions_fd = torch.stack([3 * concepts_vd[3], concepts_vd[1] + 0.1 * concepts_vd[2], torch.zeros(8)])
    names = name_latents(directions_fd, concepts_vd, vocabulary, logit_scale=20.0)
    assert names.name[:2] == ["v3", "v1"] and names.name[2] is None and names.runner_up[2] is None
    for f in range(2):
        unit = directions_fd[f] / directions_fd[f].norm()
        cosines = [float(unit @ concept) for concept in concepts_vd]
        ranked = sorted(range(5), key=lambda v: -cosines[v])
        assert names.runner_up[f] == vocabulary[ranked[1]]
        assert float(names.similarity[f]) == pytest.approx(cosines[ranked[0]], abs=1e-6)
        softmax = math.exp(20.0 * cosines[ranked[0]]) / sum(math.exp(20.0 * c) for c in cosines)
        assert float(names.confidence[f]) == pytest.approx(softmax, rel=1e-5)
    assert names.similarity[2].isnan() and names.confidence[2].isnan()


def test_names_need_the_text_space_of_the_embeddings():
    with pytest.raises(ValueError, match="width 6 but the text embeddings have 8"):
        name_latents(torch.ones(2, 6), torch.ones(3, 8), ["a", "b", "c"], 10.0)


def test_top_image_directions_by_hand():
    top_unit_kfd = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [5.0, 5.0]]])  # [k=2, F=2, D=2]
    valid_kf = torch.tensor([[True, False], [True, False]])
    mean_d = torch.tensor([0.25, 0.25])
    directions = top_image_directions(top_unit_kfd, valid_kf, mean_d)
    assert torch.equal(directions, torch.tensor([[0.25, 0.25], [0.0, 0.0]]))  # latent 1: no top image


def test_vocabulary_file(tmp_path):
    default = load_vocabulary()
    assert len(default) > 100 and "red objects" in default and "a dog" in default
    path = tmp_path / "vocabulary.txt"
    path.write_text("# mine\nred\n\n blue \n")
    assert load_vocabulary(str(path)) == ["red", "blue"]
    path.write_text("red\nblue\nred\n")
    with pytest.raises(ValueError, match=r"lists \['red'\] more than once"):
        load_vocabulary(str(path))
    path.write_text("red\n")
    with pytest.raises(ValueError, match="has 1 concepts"):
        load_vocabulary(str(path))


def test_label_config_checks_naming_and_prompts():
    base = {"sae": "s", "activations": "a", "output": "o"}
    assert parse_config(base, LabelConfig).naming_method == "none"
    assert parse_config({**base, "embeddings": "e"}, LabelConfig).naming_method == "top_images"
    with pytest.raises(ConfigError, match="needs `embeddings`"):
        parse_config({**base, "naming": "top_images"}, LabelConfig)
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config({**base, "prompts": ["a photo"]}, LabelConfig)
