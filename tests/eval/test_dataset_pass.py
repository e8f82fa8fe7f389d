"""The Ray Data map-reduce passes against single-process references on the same rows."""

import pytest
import torch

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.eval import fvu, monosemanticity_score
from vlsae_ray.eval.dataset_pass import PassPlan, first_pass, monosemanticity_map_reduce, ms_pass
from vlsae_ray.eval.metrics import ReconstructionStats
from vlsae_ray.sae import build_sae
from vlsae_ray.sae.kernels import SparseLatents

N, SHARD_ROWS = 200, 48  # 5 shards, the last one short


def activations_with_edge_cases(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 0] = 0.0  # never fires
    x[:, 1] = 1.5  # constant
    x[:, 2] = torch.tensor([1.0, 0.0, 2.0, 2.0])[torch.arange(n) % 4]  # ties, across shards
    x[:, 3] = 0.0
    x[77, 3] = 3.0  # one image only
    return x


def test_ms_map_reduce_equals_single_process(ray_cluster, store_root, dataset_pair):
    n = N
    x = activations_with_edge_cases(n, 12, seed=0)
    e = torch.randn(n, 6, generator=torch.Generator().manual_seed(1))
    acts, emb = dataset_pair(store_root, x, e, SHARD_ROWS)
    torch.manual_seed(0)
    sae = build_sae({"architecture": "topk", "d_in": 12, "n_latents": 40, "k": 3})
    sae.init_from_data(x)
    sae_uri = storage.join(store_root, "sae")
    sae.save(sae_uri)

    ms_neurons, ms_latents = monosemanticity_map_reduce(acts, emb, sae_uri, shards_per_task=2)
    with torch.no_grad():
        z = sae.encode(x)
    for ours, reference in (
        (ms_neurons, monosemanticity_score(x, e)),
        (ms_latents, monosemanticity_score(z, e)),
    ):
        assert torch.equal(ours.isnan(), reference.isnan())
        torch.testing.assert_close(ours[~ours.isnan()], reference[~reference.isnan()], atol=1e-5, rtol=0)
    assert ms_neurons[:2].isnan().all() and ms_neurons[3].isnan() and not ms_neurons[2].isnan()
    assert (~ms_latents.isnan()).sum() > 10


def test_first_pass_statistics_and_top_rows(ray_cluster, tmp_path, dataset_pair):
    n = N
    x = activations_with_edge_cases(n, 12, seed=2) + 1.0
    ids = [f"img-{i}" for i in range(n)]
    acts, emb = dataset_pair(str(tmp_path), x, torch.randn(n, 6), SHARD_ROWS, ids)
    saes = []
    for k, architecture in ((3, "topk"), (5, "matryoshka_batchtopk")):
        torch.manual_seed(k)
        config = {"architecture": architecture, "d_in": 12, "n_latents": 32, "k": k}
        if architecture != "topk":
            config["group_fractions"] = [0.25, 0.25, 0.5]
        sae = build_sae(config).eval()
        sae.init_from_data(x)
        sae.save(str(tmp_path / f"sae{k}"))
        saes.append((str(tmp_path / f"sae{k}"), sae))

    plan = PassPlan(acts, emb, saes[0][0], checkpoints=(saes[1][0],), top_k=4, shards_per_task=2)
    result = first_pass(plan)
    assert result.rows == n
    x_read, _ = store.load_activations(acts)
    for uri, sae in saes:
        with torch.no_grad():
            x_hat, z, _ = sae(x_read)
        reference = ReconstructionStats(12, 32)
        reference.update(x_read, x_hat, SparseLatents.from_mask(z, z != 0))
        assert abs(result.stats[uri].fvu() - reference.fvu()) < 1e-6
        assert result.stats[uri].l0() == reference.l0()
        assert result.stats[uri].dead_fraction() == reference.dead_fraction()
    # each Matryoshka prefix's own reconstruction: its latents through their decoder rows
    matryoshka = saes[1][1]
    with torch.no_grad():
        z = matryoshka.encode(x_read)
        expected = [
            fvu(x_read, z[:, :end] @ matryoshka.W_dec_fd[:end] + matryoshka.input_scale * matryoshka.b_dec_d)
            for end in (8, 16, 32)
        ]
    assert result.stats[saes[1][0]].prefix_fvu() == pytest.approx(expected, rel=1e-6)
    assert expected[-1] == pytest.approx(result.stats[saes[1][0]].fvu(), rel=1e-6)

    with torch.no_grad():
        z = saes[0][1].encode(x_read)
    sets = result.top.sets()
    for j in range(32):
        order = torch.sort(z[:, j], descending=True, stable=True).indices[:4]
        assert sets[j] == [int(i) for i in order if z[i, j] > 0]
        assert all(result.top.source_ids[row] == ids[row] for row in sets[j])

    neurons, latents = ms_pass(plan, result)
    torch.testing.assert_close(
        latents.nan_to_num(-1),
        monosemanticity_score(z, store.load_activations(emb)[0]).nan_to_num(-1),
        atol=1e-5,
        rtol=0,
    )
