"""Each architecture against a naive re-implementation of its equations (loops over samples)."""

import pytest
import torch

from vlsae_ray.sae import build_sae

D, F, B = 6, 10, 5


def randomised(config):
    """An SAE with every parameter and the input scale random (not the structured init)."""
    torch.manual_seed(0)
    sae = build_sae(config)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
        sae.input_scale.fill_(2.5)
    return sae


def naive_pre_acts(sae, x):
    """Pre-activations on normalised inputs x / s, in normalised units, one sample at a time."""
    s = float(sae.input_scale)
    W_enc, b_enc, b_dec = sae.W_enc_fd.detach(), sae.b_enc_f.detach(), sae.b_dec_d.detach()
    return [[float(W_enc[j] @ (xi / s - b_dec)) + float(b_enc[j]) for j in range(F)] for xi in x]


def naive_decode(sae, z_normalised):
    """x_hat = s (sum_j z_j W_dec_j + b_dec) with latents in normalised units."""
    s = float(sae.input_scale)
    W_dec, b_dec = sae.W_dec_fd.detach(), sae.b_dec_d.detach()
    return torch.stack([s * (sum(zi[j] * W_dec[j] for j in range(F)) + b_dec) for zi in z_normalised])


def naive_topk(pre, k):
    out = []
    for row in pre:
        keep = sorted(range(len(row)), key=lambda j: row[j], reverse=True)[:k]
        out.append([max(row[j], 0.0) if j in keep else 0.0 for j in range(len(row))])
    return torch.tensor(out)


def test_topk_matches_naive_equations():
    sae = randomised({"architecture": "topk", "d_in": D, "n_latents": F, "k": 3})
    x = torch.randn(B, D) * 4
    s = float(sae.input_scale)
    z_naive = naive_topk(naive_pre_acts(sae, x), 3)
    x_hat_naive = naive_decode(sae, z_naive)
    with torch.no_grad():
        x_hat, z, aux = sae(x)
        # Latents come out in raw units: s times the normalised-input latents.
        torch.testing.assert_close(sae.encode(x), s * z_naive, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(s * z_naive), x_hat_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, s * z_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_hat_naive, rtol=1e-5, atol=1e-5)
    assert ((z > 0).sum(-1) <= 3).all()
    mse_naive = sum(((xi - xh) / s).pow(2).sum() for xi, xh in zip(x, x_hat_naive, strict=True)) / B
    assert set(aux) == {"mse"}
    torch.testing.assert_close(aux["mse"], mse_naive, rtol=1e-5, atol=1e-5)


def test_topk_auxk_matches_naive_equations():
    sae = randomised({"architecture": "topk", "d_in": D, "n_latents": F, "k": 3, "aux_k": 2})
    x = torch.randn(B, D) * 4
    s = float(sae.input_scale)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    pre = naive_pre_acts(sae, x)
    # Top aux_k dead latents only, then reconstruct the residual without the decoder bias.
    dead_pre = [[row[j] if dead[j] else float("-inf") for j in range(F)] for row in pre]
    z_aux = naive_topk(dead_pre, 2)
    residual = (x - naive_decode(sae, naive_topk(pre, 3))) / s
    residual_hat = torch.stack([sum(zi[j] * sae.W_dec_fd.detach()[j] for j in range(F)) for zi in z_aux])
    mean = residual.mean(0)
    auxk_naive = sum((r - rh).pow(2).sum() for r, rh in zip(residual, residual_hat, strict=True)) / sum(
        (r - mean).pow(2).sum() for r in residual
    )
    with torch.no_grad():
        _, _, aux = sae(x, dead)
        _, _, aux_no_dead = sae(x, torch.zeros(F, dtype=torch.bool))
    torch.testing.assert_close(aux["auxk"], auxk_naive / 32, rtol=1e-4, atol=1e-6)
    assert "auxk" not in aux_no_dead


def test_relu_matches_naive_equations():
    sae = randomised({"architecture": "relu", "d_in": D, "n_latents": F, "l1_coefficient": 0.3})
    x = torch.randn(B, D) * 4
    s = float(sae.input_scale)
    z_naive = torch.tensor([[max(p, 0.0) for p in row] for row in naive_pre_acts(sae, x)])
    x_hat_naive = naive_decode(sae, z_naive)
    with torch.no_grad():
        x_hat, z, aux = sae(x)
    torch.testing.assert_close(z, s * z_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_hat_naive, rtol=1e-5, atol=1e-5)
    norms = sae.W_dec_fd.detach().norm(dim=-1)
    l1_naive = sum(sum(zi[j] * norms[j] for j in range(F)) for zi in z_naive) / B
    mse_naive = sum(((xi - xh) / s).pow(2).sum() for xi, xh in zip(x, x_hat_naive, strict=True)) / B
    torch.testing.assert_close(aux["l1"], 0.3 * l1_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux["mse"], mse_naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_fresh_sae_has_unit_decoder_and_tied_encoder(architecture):
    sae = build_sae(
        {"architecture": architecture, "d_in": D, "n_latents": F, "k": 2}
        if architecture == "topk"
        else {"architecture": architecture, "d_in": D, "n_latents": F}
    )
    torch.testing.assert_close(sae.W_dec_fd.norm(dim=-1), torch.ones(F))
    assert torch.equal(sae.W_enc_fd, sae.W_dec_fd)


def test_wrong_width_is_a_clear_error():
    sae = build_sae({"architecture": "topk", "d_in": D, "n_latents": F, "k": 2})
    with pytest.raises(ValueError, match="d_in=6"):
        sae(torch.randn(2, D + 1))


def test_parallel_gradient_removal_leaves_orthogonal_gradients():
    sae = randomised({"architecture": "topk", "d_in": D, "n_latents": F, "k": 3})
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec_fd.norm(dim=-1), torch.ones(F))
    _, _, aux = sae(torch.randn(B, D) * 4)
    sum(aux.values()).backward()
    before = sae.W_dec_fd.grad.clone()
    sae.remove_parallel_grads_()
    after = sae.W_dec_fd.grad
    W = sae.W_dec_fd.detach()
    assert (before * W).sum(-1).abs().max() > 1e-3  # there was a parallel part to remove
    tol = 1e-6 * before.abs().max()
    torch.testing.assert_close((after * W).sum(-1), torch.zeros(F), atol=tol, rtol=0)
    # Only the parallel part went: the difference is along each column.
    for j in range(F):
        torch.testing.assert_close(before[j] - after[j], (before[j] @ W[j]) * W[j], atol=tol, rtol=0)
