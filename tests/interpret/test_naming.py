"""Naming against hand-computed answers, the vocabulary file and the label config's checks."""

import math

import pytest
import torch

from vlsae_ray.config import ConfigError, LabelConfig, parse_config
from vlsae_ray.interpret.naming import (
    PatternSums,
    clip_dissect_scores,
    heldout_auroc,
    in_heldout_fold,
    load_vocabulary,
    name_latents,
    names_from_scores,
    top_image_directions,
)


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
    assert parse_config({**base, "embeddings": "e"}, LabelConfig).naming_method == "activations"
    for method in ("activations", "clip_dissect", "top_images"):
        with pytest.raises(ConfigError, match=f"naming '{method}' needs `embeddings`"):
            parse_config({**base, "naming": method}, LabelConfig)
    with pytest.raises(ConfigError, match="heldout_fraction"):
        parse_config({**base, "heldout_fraction": 1.0}, LabelConfig)
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config({**base, "prompts": ["a photo"]}, LabelConfig)


def test_pattern_sums_give_pearson_correlation_over_merged_shards():
    g = torch.Generator().manual_seed(0)
    z_nf = torch.relu(torch.randn(50, 4, generator=g))
    z_nf[:, 3] = 0  # never fires: no correlation
    s_nv = torch.randn(50, 3, generator=g)

    def sums(rows: slice) -> PatternSums:
        rows_n, latents_n = (z_nf[rows] > 0).nonzero(as_tuple=True)
        return PatternSums.of(rows_n, latents_n, z_nf[rows][rows_n, latents_n], s_nv[rows], 4)

    r_fv = (sums(slice(0, 20)) + sums(slice(20, 50))).correlation()
    expected = torch.corrcoef(torch.cat([z_nf[:, :3], s_nv], 1).T)[:3, 3:]
    torch.testing.assert_close(r_fv[:3], expected, atol=1e-5, rtol=0)
    assert r_fv[3].isnan().all()
    names, margin_f = names_from_scores(r_fv, ["a", "b", "c"])
    assert names.name[:3] == ["abc"[int(v)] for v in expected.argmax(1)] and names.name[3] is None
    best = expected.topk(2, dim=1).values
    torch.testing.assert_close(margin_f[:3], best[:, 0] - best[:, 1], atol=1e-5, rtol=0)


def test_heldout_auroc_is_the_rank_sum_auroc():
    g = torch.Generator().manual_seed(1)
    s_nv = torch.randn(40, 3, generator=g)
    fired_nf = torch.stack(
        [s_nv[:, 1] > 0.3, torch.rand(40, generator=g) > 0.5, torch.zeros(40, dtype=torch.bool)], 1
    )
    concept_f = torch.tensor([1, 2, 0])
    auroc_f = heldout_auroc(s_nv, *fired_nf.nonzero(as_tuple=True), concept_f)

    def by_pairs(scores, fired):  # P(score of a firing row > score of a silent one)
        return sum(float(a > b) for a in scores[fired] for b in scores[~fired]) / (
            fired.sum() * (~fired).sum()
        )

    assert float(auroc_f[0]) == pytest.approx(1.0)  # the concept's score decides the firing
    assert float(auroc_f[1]) == pytest.approx(float(by_pairs(s_nv[:, 2], fired_nf[:, 1])), abs=1e-6)
    assert auroc_f[2].isnan()  # never fires on these rows
    assert heldout_auroc(s_nv, *fired_nf.nonzero(as_tuple=True), torch.tensor([-1, 2, 0]))[0].isnan()


def test_clip_dissect_soft_wpmi_by_hand():
    p_kv = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])  # two top images, three concepts
    mean_p_v = torch.tensor([0.5, 0.25, 0.25])
    valid_kf = torch.tensor([[True, True], [True, False]])
    scores_fv = clip_dissect_scores(p_kv.log()[:, None].expand(2, 2, 3), valid_kf, mean_p_v)
    both = 1 - (1 - 0.998 * p_kv[0]) * (1 - 0.97 * p_kv[1])
    torch.testing.assert_close(scores_fv[0], both.log() - mean_p_v.log())
    torch.testing.assert_close(scores_fv[1], (0.998 * p_kv[0]).log() - mean_p_v.log())  # one valid image


def test_heldout_fold_is_stable_and_of_the_asked_size():
    ids = [f"item-{i}" for i in range(4000)]
    fold = [in_heldout_fold(i, 0.2) for i in ids]
    assert fold == [in_heldout_fold(i, 0.2) for i in ids]
    assert 0.18 < sum(fold) / len(ids) < 0.22
    assert all(in_heldout_fold(i, 0.5) for i, held in zip(ids, fold, strict=True) if held)  # nested folds
