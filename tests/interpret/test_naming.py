"""Naming against hand-computed answers, the vocabulary file and the label config's checks."""

import math

import pytest
import torch

from vlsae_ray.config import ConfigError, LabelConfig, parse_config
from vlsae_ray.interpret.naming import (
    PatternSums,
    ShardSums,
    calibrated_confidence,
    clip_dissect_scores,
    heldout_auroc,
    in_heldout_fold,
    load_vocabulary,
    name_latents,
    names_from_scores,
    specific_names,
    top_image_directions,
    top_share,
    zero_shot_log_probability,
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
    # a comment line starts a block of alternatives; blank lines do not
    path.write_text("# intro\n\n# colours\nred\nblue\n\n# shapes\ncircles\nstars\n\ntriangles\n")
    vocabulary = load_vocabulary(str(path))
    assert vocabulary == ["red", "blue", "circles", "stars", "triangles"]
    assert vocabulary.block_v.tolist() == [0, 0, 1, 1, 1]
    assert load_vocabulary("world").block_v.unique().numel() == 7  # colours, shapes, ... backgrounds
    path.write_text("# colours\nred\nblue\n# shapes\ncircles\n")
    with pytest.raises(ValueError, match=r"\['circles'\] are alone in their block"):
        load_vocabulary(str(path))
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


def test_zero_shot_probabilities_within_blocks_by_hand():
    g = torch.Generator().manual_seed(2)
    unit_nd = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    concepts_vd = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    block_v = torch.tensor([0, 0, 1, 1, 1])
    log_p_nv = zero_shot_log_probability(unit_nd, concepts_vd, 10.0, block_v)
    for n in range(6):
        for block in ([0, 1], [2, 3, 4]):
            logits = [10.0 * float(unit_nd[n] @ concepts_vd[v]) for v in block]
            total = sum(math.exp(logit) for logit in logits)
            expected = [math.log(math.exp(logit) / total) for logit in logits]
            assert log_p_nv[n, block].tolist() == pytest.approx(expected, abs=1e-5)
    flat = zero_shot_log_probability(unit_nd, concepts_vd, 10.0)  # one block: CLIP's plain classifier
    torch.testing.assert_close(flat, (10.0 * unit_nd @ concepts_vd.T).log_softmax(-1))


def test_pattern_sums_give_the_chance_corrected_agreement_over_merged_shards():
    g = torch.Generator().manual_seed(0)
    z_nf = torch.relu(torch.randn(50, 4, generator=g))
    z_nf[:, 3] = 0  # never fires: no agreement
    p_nv = torch.rand(50, 3, generator=g)

    def sums(rows: slice) -> PatternSums:
        rows_n, latents_n = (z_nf[rows] > 0).nonzero(as_tuple=True)
        return PatternSums.of(rows_n, latents_n, z_nf[rows][rows_n, latents_n], p_nv[rows], 4)

    merged = sums(slice(0, 20)) + sums(slice(20, 50))
    # what a label task sends: only the latents that fired in its shard, folded in place
    folded = PatternSums.zeros(4, 3)
    for rows in (slice(0, 20), slice(20, 50)):
        rows_n, latents_n = (z_nf[rows] > 0).nonzero(as_tuple=True)
        shard = ShardSums.of(rows_n, latents_n, z_nf[rows][rows_n, latents_n], p_nv[rows])
        assert shard.latents_u.tolist() == [0, 1, 2] and shard.zp_uv.shape == (3, 3)
        folded.add_(shard)
    for got, expected in zip(folded, merged, strict=True):
        torch.testing.assert_close(got, expected)
    a_fv = merged.agreement()
    for f in range(3):  # the activation-weighted share of the concept against its share of all rows
        for v in range(3):
            weighted = sum(float(z_nf[i, f] * p_nv[i, v]) for i in range(50)) / float(z_nf[:, f].sum())
            base = float(p_nv[:, v].mean())
            assert float(a_fv[f, v]) == pytest.approx((weighted - base) / (1 - base), abs=1e-5)
    assert a_fv[3].isnan().all()
    torch.testing.assert_close(merged.mean_p(), p_nv.mean(0))
    # a latent firing exactly where a 0/1 concept holds agrees 1; one firing independently of it, 0
    holds_n = torch.arange(40) % 4 == 0
    z_n2 = torch.stack([holds_n.float(), (torch.arange(40) % 8 < 4).float()], 1)
    rows_n, latents_n = z_n2.nonzero(as_tuple=True)
    a = PatternSums.of(rows_n, latents_n, z_n2[rows_n, latents_n], holds_n.float()[:, None], 2).agreement()
    assert a[:, 0].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    names = names_from_scores(a_fv, ["a", "b", "c"])
    assert names.name[:3] == ["abc"[int(v)] for v in a_fv[:3].argmax(1)] and names.name[3] is None
    assert names.runner_up[:3] == ["abc"[int(v)] for v in a_fv[:3].topk(2, dim=1).indices[:, 1]]


def test_the_most_specific_of_tied_concepts_is_the_name():
    agreement_fv = torch.tensor(
        [[0.95, 1.0, 0.5, 0.2], [0.5, 1.0, 0.2, 0.85], [0.7, 0.6, 0.65, 0.0], [float("nan")] * 4]
    )
    mean_p_v = torch.tensor([0.1, 0.5, 0.05, 0.3])
    names = specific_names(agreement_fv, mean_p_v, ["rare", "common", "rarest", "mid"])
    # latent 0: "rare" ties the best and is rarer; latent 1: "mid" is not within 0.1; latent 2: all
    # within 0.1 of the best but "mid", so the rarest of them
    assert names.name == ["rare", "common", "rarest", None]
    assert names.runner_up[:3] == ["common", "mid", "rare"]
    assert names.similarity[:3].tolist() == pytest.approx([0.95, 1.0, 0.65]) and names.similarity[3].isnan()


def test_top_share_and_its_calibrated_confidence():
    top_p_kf = torch.tensor([[0.9, 0.2, 0.7], [0.7, 0.4, 0.0], [0.8, 0.0, 0.0]])
    valid_kf = torch.tensor([[True, True, False], [True, True, False], [True, False, False]])
    share_f = top_share(top_p_kf, valid_kf)
    assert share_f[:2].tolist() == pytest.approx([0.8, 0.3]) and share_f[2].isnan()
    confidence_f = calibrated_confidence(torch.tensor([0.3, 0.8, 1.0]))
    assert confidence_f[0] < 0.01 and confidence_f[2] > 0.99 and bool((confidence_f.diff() > 0).all())


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
