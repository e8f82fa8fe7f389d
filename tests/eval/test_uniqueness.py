import math

import pytest

from vlsae_ray.eval.uniqueness import top_set_overlap


def test_top_set_overlap_against_a_hand_computed_case():
    sets = [
        [1, 2, 3],  # J with latent 1: |{2,3}| / |{1,2,3,4}| = 0.5; with latent 2: 1/5
        [2, 3, 4],  # with 0: 0.5; with 2: 0
        [3, 7, 8],  # with 0: 1/5; with 1: 1/5 ({3} / {2,3,4,7,8})
        [],  # never fires: left out
        [9, 10],  # duplicate of latent 5
        [10, 9],
    ]
    result = top_set_overlap(sets)
    expected = [0.5, 0.5, 0.2, math.nan, 1.0, 1.0]
    assert result["max_jaccard"][:3].tolist() == pytest.approx(expected[:3])
    assert math.isnan(result["max_jaccard"][3])
    assert result["max_jaccard"][4:].tolist() == [1.0, 1.0]
    assert result["latents"] == 5
    assert result["mean_max_jaccard"] == pytest.approx((0.5 + 0.5 + 0.2 + 1 + 1) / 5)
    assert result["uniqueness"] == pytest.approx(1 - 3.2 / 5)
    assert result["duplicate_fraction"] == pytest.approx(2 / 5)


def test_disjoint_sets_are_fully_unique():
    result = top_set_overlap([[0, 1], [2], [3, 4, 5]])
    assert result["uniqueness"] == 1.0 and result["duplicate_fraction"] == 0.0
    assert math.isnan(top_set_overlap([[], []])["uniqueness"])
