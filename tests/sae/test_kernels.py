"""The sparse kernels against the dense reference: same values, same gradients, every k-sparse SAE."""

import pytest
import torch

from vlsae_ray.sae import kernels

D, F, B = 8, 64, 12
CONFIGS = [
    {"architecture": "topk", "d_in": D, "n_latents": F, "k": 3, "aux_k": 4},
    {"architecture": "batchtopk", "d_in": D, "n_latents": F, "k": 3, "aux_k": 4},
    {
        "architecture": "matryoshka_batchtopk",
        "d_in": D,
        "n_latents": F,
        "k": 3,
        "group_fractions": [0.25, 0.75],
    },
    {"architecture": "vl_sae", "d_in": D, "n_latents": F, "k": 3},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["architecture"])
def test_sparse_path_equals_dense_path_in_values_and_gradients(config, perturbed_sae, loss_and_grads):
    sae = perturbed_sae(config)
    x = 4 * torch.randn(B, D)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    kwargs = {"modality_b": torch.arange(B) % 3 == 0} if config["architecture"] == "vl_sae" else {}
    assert kernels.use_sparse(sae.max_active(B), B, F)
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    sparse = loss_and_grads(sae, x, dead, **kwargs)
    sae.load_state_dict(state)  # BatchTopK's threshold moved; start both from the same state
    with kernels.dense_reference():
        assert not kernels.use_sparse(sae.max_active(B), B, F)
        dense = loss_and_grads(sae, x, dead, **kwargs)
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-5, atol=1e-5)
    assert sparse[2] == pytest.approx(dense[2], rel=1e-5)
    if config["architecture"] != "vl_sae":
        assert "auxk" in sparse[2]
    assert sparse[3].keys() == dense[3].keys()
    for name in sparse[3]:
        torch.testing.assert_close(sparse[3][name], dense[3][name], rtol=1e-4, atol=1e-6, msg=name)
        assert sparse[3][name].abs().sum() > 0, name


def test_sparse_latents_round_trip_through_dense():
    torch.manual_seed(0)
    values = torch.randn(4, 10)
    mask = values > 0.5
    mask[2] = False  # an empty row
    latents = kernels.SparseLatents.from_mask(values, mask)
    torch.testing.assert_close(latents.to_dense(), torch.where(mask, values, torch.zeros(())))
    assert latents.l0() == pytest.approx(mask.sum().item() / 4)
    W = torch.randn(10, 3)
    torch.testing.assert_close(kernels.decode(latents, W, True), kernels.decode(latents, W, False))
