import itertools

import pytest
import torch

from vlsae_ray.eval.concept_similarity import concept_similarity


def naive(images, texts):
    """The definitions as double loops over rows."""

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))

    def mean_cross(a, b):
        return sum(cos(x, y) for x in a for y in b) / (len(a) * len(b))

    def mean_pairs(a):
        pairs = list(itertools.combinations(range(len(a)), 2))
        return sum(cos(a[i], a[j]) for i, j in pairs) / len(pairs)

    c = len(images)
    others = [(i, j) for i in range(c) for j in range(c) if i != j]
    return {
        "intra_image": sum(mean_pairs(v) for v in images) / c,
        "inter_image": sum(mean_cross(images[i], images[j]) for i, j in others) / len(others),
        "intra_text": sum(mean_pairs(t) for t in texts) / c,
        "inter_text": sum(mean_cross(texts[i], texts[j]) for i, j in others) / len(others),
        "intra_image_text": sum(mean_cross(v, t) for v, t in zip(images, texts, strict=True)) / c,
        "inter_image_text": sum(mean_cross(images[i], texts[j]) for i, j in others) / len(others),
    }


def test_concept_similarity_matches_the_pairwise_definitions():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(m, 5, generator=g) for m in (2, 4, 3)]
    texts = [torch.randn(m, 5, generator=g) for m in (3, 2, 5)]
    ours = concept_similarity([*images, torch.randn(1, 5)], [*texts, torch.randn(4, 5)])
    assert ours["concepts"] == 3  # the concept with one top image is left out
    expected = naive(images, texts)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


def test_tight_concepts_score_high_intra_and_low_inter():
    directions = torch.eye(4)
    images = [directions[j] + 0.01 * torch.randn(5, 4) for j in range(4)]
    texts = [directions[j] + 0.01 * torch.randn(5, 4) for j in range(4)]
    result = concept_similarity(images, texts)
    assert result["intra_image"] > 0.99 and result["intra_image_text"] > 0.99
    assert abs(result["inter_image"]) < 0.05 and abs(result["inter_image_text"]) < 0.05
