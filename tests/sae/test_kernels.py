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


def test_sparse_decode_under_autocast_is_a_bf16_product_returned_in_fp32():
    torch.manual_seed(0)
    W = torch.randn(F, D, requires_grad=True)
    values = 3 * torch.rand(B, 4)
    latents = kernels.SparseLatents.from_topk(values, torch.randint(0, F, (B, 4)), F)
    # reference: the product of the bf16-rounded values and weights, exactly (fp64)
    exact_bf16 = latents.to_dense().bfloat16().double() @ W.detach().bfloat16().double()
    exact_fp32 = latents.to_dense().double() @ W.detach().double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.compute_dtype(W) == torch.bfloat16
        x_hat = kernels.decode(latents, W, sparse=True)
    assert x_hat.dtype == torch.float32
    # fp32 accumulation, one rounding to bf16 (relative 2^-9) at the end
    torch.testing.assert_close(x_hat.double(), exact_bf16, rtol=2**-8, atol=1e-6)
    assert (x_hat.double() - exact_fp32).abs().max() > 1e-4  # not the fp32 product
    # the backward runs in fp32 on the saved fp32 values: S^T g to fp32 rounding
    g = torch.randn(B, D)
    (x_hat * g).sum().backward()
    torch.testing.assert_close(W.grad, latents.to_dense().T @ g, rtol=1e-5, atol=1e-5)
    assert kernels.compute_dtype(W) == torch.float32  # outside autocast


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["architecture"])
def test_sparse_path_equals_dense_path_under_bf16_autocast(config, perturbed_sae, loss_and_grads):
    """Both paths select on the same bf16 pre-activations and decode in bf16; losses and grads in fp32."""
    sae = perturbed_sae(config)
    x = 4 * torch.randn(B, D)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    kwargs = {"modality_b": torch.arange(B) % 3 == 0} if config["architecture"] == "vl_sae" else {}
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sparse = loss_and_grads(sae, x, dead, **kwargs)
        sae.load_state_dict(state)
        with kernels.dense_reference():
            dense = loss_and_grads(sae, x, dead, **kwargs)
        sae.load_state_dict(state)
    fp32 = loss_and_grads(sae, x, dead, **kwargs)
    assert sparse[0].dtype == sparse[1].dtype == torch.float32
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-2, atol=1e-2)  # the same latents
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-2, atol=1e-2)
    assert sparse[2] == pytest.approx(dense[2], rel=2e-2)
    assert sparse[2] != fp32[2]  # bf16 products, not the fp32 ones
    assert sparse[2] == pytest.approx(fp32[2], rel=5e-2)
    for name in sparse[3]:
        assert sparse[3][name].dtype == torch.float32, name
        torch.testing.assert_close(sparse[3][name], dense[3][name], rtol=5e-2, atol=5e-2, msg=name)
