"""The distributed top-k of the label job against one exact sorted pass over the whole dataset."""

import numpy as np
import pytest
import torch

from vlsae_ray.eval.top_rows import TopK, merge_top_k
from vlsae_ray.interpret.top_examples import (
    HISTOGRAM_EDGES,
    histogram_bins,
    top_examples,
    trimmed_histogram,
)
from vlsae_ray.sae import build_sae
from vlsae_ray.sae.kernels import SparseLatents

SHARD_ROWS = (50, 7, 3, 40)  # one shard shorter than k


def test_streaming_topk_of_sparse_latents_equals_full_sort_of_dense():
    g = torch.Generator().manual_seed(0)
    values = torch.relu(torch.randn(230, 12, generator=g) - 1.0)  # about 16% active
    values[:, 3] = 1.0  # all tied: the earliest rows win
    values[:, 5] = 0.0  # never fires: the earliest rows, at 0
    values[100:, 7] = 0.0  # fires only in the first batches
    active = (values != 0) | (torch.rand(230, 12, generator=g) < 0.05)  # some active entries are 0
    top = TopK(5, 12)
    for start in range(0, 230, 37):  # the last batch (8 rows) is shorter than 2k
        rows = slice(start, start + 37)
        top.update(SparseLatents.from_mask(values[rows], active[rows]))
    expected = torch.sort(values, dim=0, descending=True, stable=True)
    assert torch.equal(top.values_kf, expected.values[:5])
    assert torch.equal(top.rows_kf, expected.indices[:5])
    assert top.rows_kf[:, 3].tolist() == [0, 1, 2, 3, 4] and top.rows_kf[:, 5].tolist() == [0, 1, 2, 3, 4]

    small = TopK(5, 12)  # fewer rows than k: as many rows as seen
    small.update(SparseLatents.from_mask(values[:3], active[:3]))
    head = torch.sort(values[:3], dim=0, descending=True, stable=True)
    assert torch.equal(small.values_kf, head.values) and torch.equal(small.rows_kf, head.indices)


def test_merge_is_independent_of_arrival_order():
    values = torch.tensor([[1.0], [2.0], [2.0], [1.0]])
    rows = torch.tensor([[9], [7], [3], [1]])
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        top_values, top_rows = merge_top_k(values[order], rows[order], 3)
        assert top_values.flatten().tolist() == [2.0, 2.0, 1.0]
        assert top_rows.flatten().tolist() == [3, 7, 1]


def dyadic(shape, generator, scale):
    """Random multiples of 1/scale in [-1, 1]: their products and short sums are exact in fp32, so
    the SAE's latents do not depend on how rows are batched."""
    return torch.randint(-scale, scale + 1, shape, generator=generator).float() / scale


@pytest.fixture
def tied_dataset(store_root, write_dataset):
    g = torch.Generator().manual_seed(0)
    d, n_latents, never = 6, 40, [5, 17, 33]
    sae = build_sae({"architecture": "topk", "d_in": d, "n_latents": n_latents, "k": 3})
    with torch.no_grad():
        sae.W_enc_fd.copy_(dyadic((n_latents, d), g, 64))
        sae.W_enc_fd[never] = 0  # these latents' pre-activation is -1 on every row: they never fire
        sae.b_enc_f.zero_()
        sae.b_enc_f[never] = -1
    sae.save(f"{store_root}/sae")
    x_nd = dyadic((sum(SHARD_ROWS), d), g, 8)
    x_nd[60:70] = x_nd[0:10]  # the same rows again in other shards: ties across shards
    x_nd[90:97] = x_nd[52:59]
    ids = [f"item-{i}" for i in range(x_nd.shape[0])]
    dataset = write_dataset(f"{store_root}/activations", x_nd, ids, SHARD_ROWS)
    with torch.no_grad():
        z_nf = sae.encode(x_nd)
    return dataset, f"{store_root}/sae", z_nf, never


def test_distributed_top_k_equals_single_process_exact_top_k(ray_cluster, tied_dataset):
    dataset, sae, z_nf, never = tied_dataset
    expected = torch.sort(z_nf, dim=0, descending=True, stable=True)
    top = top_examples(dataset, sae, k=5, batch_size=16)
    assert torch.equal(top.values_kf, expected.values[:5])
    assert torch.equal(top.rows_kf, expected.indices[:5])
    assert torch.equal(top.firing_count_f, (z_nf > 0).sum(0))
    assert top.source_ids == {row: f"item-{row}" for row in expected.indices[:5].unique().tolist()}
    assert top.rows == z_nf.shape[0]
    # the case is as hard as intended: cross-shard ties decide some top-5 sets, some latents never fire
    kth_f = expected.values[4]
    tied_at_kth = [j for j in range(z_nf.shape[1]) if kth_f[j] > 0 and (z_nf[:, j] == kth_f[j]).sum() > 1]
    assert tied_at_kth and (top.firing_count_f[never] == 0).all()
    assert top.rows_kf[:, never].tolist() == [[i] * 3 for i in range(5)]


def numpy_histogram(values: torch.Tensor, edges: list[float]) -> list[int]:
    """numpy's histogram of the positive values over `edges`, values outside the label job's bins
    counted in its end bins."""
    positive = values[values > 0].numpy()
    inside = np.clip(positive, HISTOGRAM_EDGES[0].item(), HISTOGRAM_EDGES[-1].item())
    return np.histogram(inside, bins=np.array(edges, dtype=np.float32))[0].tolist()


def test_activation_histograms_equal_numpy_histograms(ray_cluster, tied_dataset):
    """Dyadic activations land exactly on the bins' power-of-two edges: numpy's rule decides them."""
    dataset, sae, z_nf, never = tied_dataset
    top = top_examples(dataset, sae, k=5, batch_size=16)
    on_an_edge = 0
    for j in range(z_nf.shape[1]):
        edges, counts = trimmed_histogram(top.histogram_fb[j])
        if not (z_nf[:, j] > 0).any():
            assert edges is None and counts is None and top.firing_count_f[j] == 0
            continue
        assert j not in never
        assert len(edges) == len(counts) + 1 and counts[0] > 0 and counts[-1] > 0
        assert counts == numpy_histogram(z_nf[:, j], edges)
        assert sum(counts) == top.firing_count_f[j] == (z_nf[:, j] > 0).sum()
        on_an_edge += int(torch.isin(z_nf[:, j], HISTOGRAM_EDGES).sum())
    assert on_an_edge > 0


def test_histogram_bins_put_values_outside_the_edges_in_the_end_bins():
    values = torch.tensor([1e-9, 2.0**-16, 0.3, 1.0, 2.0**16, 1e9])
    bins = histogram_bins(values)
    assert bins.tolist()[:2] == [0, 0] and bins.tolist()[-2:] == [len(HISTOGRAM_EDGES) - 2] * 2
    counts = torch.bincount(bins, minlength=len(HISTOGRAM_EDGES) - 1).tolist()
    assert counts == numpy_histogram(values, HISTOGRAM_EDGES.tolist())
