import math

import pytest
import torch

from vlsae_ray.eval import MonosemanticityAccumulator, ReconstructionStats, fvu, l0, monosemanticity_score
from vlsae_ray.sae.kernels import SparseLatents


def naive_ms(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Pach et al.'s definition as written: a double loop over image pairs n < m."""
    a, e = a.double(), e.double()
    n_images, n_neurons = a.shape
    scores = []
    for k in range(n_neurons):
        lo, hi = a[:, k].min(), a[:, k].max()
        if hi == lo:
            scores.append(math.nan)
            continue
        norm = (a[:, k] - lo) / (hi - lo)
        num = den = 0.0
        for n in range(n_images):
            for m in range(n + 1, n_images):
                w = float(norm[n] * norm[m])
                num += w * float(torch.nn.functional.cosine_similarity(e[n], e[m], dim=0))
                den += w
        scores.append(num / den if den > 0 else math.nan)
    return torch.tensor(scores)


def test_ms_equals_naive_pairwise():
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(40, 7, generator=g))
    a[:, 0] = 0.0  # never fires
    a[:, 1] = 2.5  # constant
    a[:, 2] = torch.tensor([1.0, 1.0, 0.0, 3.0] * 10)  # ties
    a[:, 3] = 0.0
    a[5, 3] = 4.0  # fires on one image only: no weighted pair
    a[:, 4] = torch.tensor([2.0, 2.0, 0.5, 2.0] * 10)  # ties at the maximum
    a[:, 5] = torch.randn(40, generator=g)  # a raw neuron: negative values too
    e = torch.randn(40, 5, generator=g)
    ours, reference = monosemanticity_score(a, e, chunk_size=9), naive_ms(a, e)
    assert torch.equal(ours.isnan(), reference.isnan())
    assert ours.isnan()[:2].all() and ours.isnan()[3]
    torch.testing.assert_close(
        ours[~ours.isnan()].double(), reference[~reference.isnan()].double(), atol=1e-5, rtol=0
    )


def test_ms_of_a_neuron_firing_on_identical_images_is_one():
    e = torch.randn(30, 4)
    e[:10] = e[0]  # ten copies of one image
    a = torch.zeros(30, 1)
    a[:10] = 1.0
    assert monosemanticity_score(a, e)[0].item() == pytest.approx(1.0, abs=1e-6)


def test_ms_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same N images"):
        monosemanticity_score(torch.zeros(3, 2), torch.zeros(4, 2))


def test_fvu_l0_and_streaming_stats_agree():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 6, generator=g) + 3.0
    x_hat = x + 0.3 * torch.randn(100, 6, generator=g)
    z = torch.relu(torch.randn(100, 10, generator=g))
    z[:, 9] = 0.0
    naive_fvu = sum(float((x[i] - x_hat[i]).pow(2).sum()) for i in range(100)) / sum(
        float((x[i] - x.mean(0)).pow(2).sum()) for i in range(100)
    )
    assert fvu(x, x_hat) == pytest.approx(naive_fvu, rel=1e-6)
    assert l0(z) == pytest.approx(sum(int((z[i] != 0).sum()) for i in range(100)) / 100)
    stats = ReconstructionStats(6, 10)
    for start in range(0, 100, 17):
        chunk = z[start : start + 17]
        stats.update(
            x[start : start + 17], x_hat[start : start + 17], SparseLatents.from_mask(chunk, chunk != 0)
        )
    assert stats.fvu() == pytest.approx(naive_fvu, rel=1e-6)
    assert stats.l0() == pytest.approx(l0(z))
    assert stats.dead_fraction() == pytest.approx(0.1)


def test_ms_of_sparse_latents_equals_the_dense_path():
    """SAE latents as `SparseLatents` (no dense [N, F]) give the dense accumulator's bounds and score."""
    g = torch.Generator().manual_seed(3)
    n, f = 300, 20
    z = torch.relu(torch.randn(n, f, generator=g) - 0.8)  # about 20% active
    z[:, 0] = 0.0  # never fires: no score
    z[:, 1] = 0.5 + torch.rand(n, generator=g)  # active on every row: its min is above 0
    z[:, 2] = 0.0
    z[7, 2] = 2.0  # one image only
    active = (z != 0) | (torch.rand(n, f, generator=g) < 0.05)  # some active entries are exactly 0
    e = torch.randn(n, 6, generator=g)
    dense = MonosemanticityAccumulator(f, 6)
    sparse = MonosemanticityAccumulator(f, 6)
    chunks = [(start, start + 70) for start in range(0, n, 70)]
    for pass_ in ("observe", "accumulate"):
        for a, b in chunks:
            latents = SparseLatents.from_mask(z[a:b], active[a:b])
            getattr(dense, pass_)(*((z[a:b],) if pass_ == "observe" else (z[a:b], e[a:b])))
            getattr(sparse, pass_)(*((latents,) if pass_ == "observe" else (latents, e[a:b])))
        if pass_ == "observe":
            assert torch.equal(sparse.min_f, dense.min_f) and torch.equal(sparse.max_f, dense.max_f)
            assert dense.min_f[1] > 0
    ours, reference = sparse.score(), dense.score()
    assert torch.equal(ours.isnan(), reference.isnan()) and ours[[0, 2]].isnan().all()
    torch.testing.assert_close(ours[~ours.isnan()], reference[~reference.isnan()], atol=1e-6, rtol=0)
    torch.testing.assert_close(sparse.weighted_fe, dense.weighted_fe, atol=1e-10, rtol=1e-10)
