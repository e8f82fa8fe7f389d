"""TopK's bf16 encoder shortlist against the exact fp32 encoder: same latents, values and gradients."""

import pydantic
import pytest
import torch

from vlsae_ray.sae import build_sae, kernels

D, F, B, K = 16, 256, 64, 4


def test_a_shortlist_of_every_latent_gives_the_exact_values_and_gradients(perturbed_sae, loss_and_grads):
    exact = perturbed_sae({"architecture": "topk", "d_in": D, "n_latents": F, "k": K, "aux_k": 1})
    shortlisted = perturbed_sae(
        {"architecture": "topk", "d_in": D, "n_latents": F, "k": K, "aux_k": 1, "encoder_shortlist": F}
    )
    x = 4 * torch.randn(B, D)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::64] = True  # four dead latents and aux_k=1: bf16 only has to rank well-separated values
    assert kernels.use_sparse(exact.max_active(B), B, F)
    assert not shortlisted.encoder_pass(x).exact and exact.encoder_pass(x).exact
    reference, fast = loss_and_grads(exact, x, dead), loss_and_grads(shortlisted, x, dead)
    torch.testing.assert_close(fast[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], reference[1], rtol=1e-5, atol=1e-5)
    assert "auxk" in fast[2] and fast[2] == pytest.approx(reference[2], rel=1e-5)
    for name, grad in reference[3].items():
        torch.testing.assert_close(fast[3][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_short_shortlist_selects_the_exact_top_k_with_exact_values(perturbed_sae):
    config = {"architecture": "topk", "d_in": 64, "n_latents": 2048, "k": 16}
    exact = perturbed_sae(config)
    shortlisted = perturbed_sae({**config, "encoder_shortlist": 8})
    x = 4 * torch.randn(512, 64)
    with torch.no_grad():
        z_exact = exact.train()(x)[1]
        z_fast = shortlisted.train()(x)[1]
    same_rows = ((z_fast != 0) == (z_exact != 0)).all(-1)
    assert same_rows.float().mean() >= 0.99
    torch.testing.assert_close(z_fast[same_rows], z_exact[same_rows], rtol=1e-5, atol=1e-5)
    # Values read off the bf16 GEMM would all be bf16-representable: these were recomputed in fp32.
    assert not torch.equal(z_fast.bfloat16().float(), z_fast)


def test_batchtopk_rejects_the_shortlist():
    with pytest.raises(pydantic.ValidationError, match="encoder_shortlist"):
        build_sae({"architecture": "batchtopk", "d_in": D, "n_latents": F, "k": K, "encoder_shortlist": 8})
