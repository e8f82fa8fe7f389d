"""BatchTopK, Matryoshka, JumpReLU and VL-SAE against naive re-implementations of their equations."""

import math

import pytest
import torch

from vlsae_ray.sae import build_sae

D, F, B = 6, 16, 5


def randomised(config, scale=2.5):
    torch.manual_seed(0)
    sae = build_sae(config)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name != "log_threshold_f":
                p.copy_(torch.randn_like(p))
        sae.input_scale.fill_(scale)
    return sae


def naive_pre(sae, x):
    """Raw-unit pre-activations, one latent at a time: s (W_enc_j . (x/s - b_dec) + b_enc_j)."""
    s = float(sae.input_scale)
    W, b_enc, b_dec = sae.W_enc_fd.detach(), sae.b_enc_f.detach(), sae.b_dec_d.detach()
    return torch.tensor(
        [[s * (float(W[j] @ (xi / s - b_dec)) + float(b_enc[j])) for j in range(F)] for xi in x]
    )


def naive_mse(x, x_hat, s):
    return sum(((xi - xh) / s).pow(2).sum() for xi, xh in zip(x, x_hat, strict=True)) / len(x)


def test_batchtopk_keeps_the_batch_top_k_times_b_and_infers_with_its_threshold():
    sae = randomised(
        {"architecture": "batchtopk", "d_in": D, "n_latents": F, "k": 2, "threshold_momentum": 0.5}
    )
    x = torch.randn(B, D) * 4
    pre = naive_pre(sae, x)
    flat = sorted(((float(pre[b, j]), b, j) for b in range(B) for j in range(F)), reverse=True)[: 2 * B]
    z_naive = torch.zeros(B, F)
    for value, b, j in flat:
        z_naive[b, j] = max(value, 0.0)
    smallest = min(v for v, _, _ in flat if v > 0)
    x_hat_naive = z_naive @ sae.W_dec_fd.detach() + float(sae.input_scale) * sae.b_dec_d.detach()
    x_hat, z, aux = sae.train()(x)
    torch.testing.assert_close(z.detach(), z_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat.detach(), x_hat_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux["mse"].detach(), naive_mse(x, x_hat_naive, 2.5), rtol=1e-5, atol=1e-5)
    # The first training batch sets θ; a pass without gradients leaves it; a second batch averages
    # with momentum min(0.5, 1 / 11) (the running average forgets its start).
    assert float(sae.threshold) == pytest.approx(smallest, rel=1e-5)
    with torch.no_grad():
        sae(torch.randn(B, D))
    assert float(sae.threshold) == pytest.approx(smallest, rel=1e-5)
    x2 = torch.randn(B, D) * 4
    pre2 = naive_pre(sae, x2).flatten().sort(descending=True).values[: 2 * B]
    sae(x2)
    m = 1 / 11
    assert float(sae.threshold) == pytest.approx(
        m * smallest + (1 - m) * float(pre2[pre2 > 0].min()), rel=1e-5
    )
    with torch.no_grad():
        z_eval = sae.eval().encode(x)
    theta = float(sae.threshold)
    torch.testing.assert_close(z_eval, torch.where(pre > theta, pre, torch.zeros(())), rtol=1e-5, atol=1e-5)


def test_matryoshka_loss_averages_the_nested_prefix_reconstructions():
    config = {
        "architecture": "matryoshka_batchtopk",
        "d_in": D,
        "n_latents": F,
        "k": 3,
        "group_fractions": [0.25, 0.25, 0.5],
        "group_weights": [1.0, 2.0, 3.0],
    }
    sae = randomised(config)
    x = torch.randn(B, D) * 4
    s = float(sae.input_scale)
    with torch.no_grad():
        x_hat, z, aux = sae.train()(x)
    W, b = sae.W_dec_fd.detach(), sae.b_dec_d.detach()
    losses = [naive_mse(x, z[:, :end] @ W[:end] + s * b, s) for end in (4, 8, 16)]
    expected = (1 * losses[0] + 2 * losses[1] + 3 * losses[2]) / 6
    torch.testing.assert_close(aux["mse"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_hat, z @ W + s * b, rtol=1e-5, atol=1e-5)
    assert len({round(float(loss), 3) for loss in losses}) == 3  # the prefixes differ, so weights matter


def test_matryoshka_groups_must_cover_the_dictionary():
    with pytest.raises(ValueError, match="sum to 1"):
        build_sae(
            {
                "architecture": "matryoshka_batchtopk",
                "d_in": D,
                "n_latents": F,
                "k": 2,
                "group_fractions": [0.5],
            }
        )


def test_jumprelu_values_and_straight_through_threshold_gradients():
    config = {"architecture": "jumprelu", "d_in": D, "n_latents": F, "bandwidth": 0.5, "l0_coefficient": 0.1}
    sae = randomised(config, scale=2.0)
    with torch.no_grad():
        sae.log_threshold_f.copy_(torch.rand(F).add(0.2).log())
    x = torch.randn(B, D) * 4
    s, eps = 2.0, 0.5
    theta = sae.log_threshold_f.detach().exp()
    pre_norm = naive_pre(sae, x) / s
    z_naive = s * pre_norm * (pre_norm > theta)
    x_hat, z, aux = sae.train()(x)
    torch.testing.assert_close(z, z_naive, rtol=1e-5, atol=1e-5)
    l0_naive = (pre_norm > theta).float().sum() / B
    torch.testing.assert_close(aux["l0"], 0.1 * l0_naive)
    sum(aux.values()).backward()
    # d loss / d theta_j by the paper's STE (eqs. 11-12), then the chain rule through exp(log θ).
    window = ((pre_norm - theta) / eps).abs() < 0.5
    residual_grad = 2 * (x_hat.detach() - x) / s**2 / B  # d mse / d x_hat
    dz = residual_grad @ sae.W_dec_fd.detach().T  # d mse / d z (raw units)
    d_theta = (dz * s * (-(theta / eps) * window)).sum(0) + 0.1 * (-(1 / eps) * window).sum(0) / B
    torch.testing.assert_close(sae.log_threshold_f.grad, d_theta * theta, rtol=1e-4, atol=1e-6)
    assert window.any()


def test_vlsae_distance_encoder_and_modality_decoders():
    sae = randomised({"architecture": "vl_sae", "d_in": D, "n_latents": F, "k": 3})
    x = torch.randn(B, D) * 4
    text = torch.tensor([False, True, False, True, True])
    W = sae.W_enc_fd.detach()
    s = 2.5
    a = torch.tensor(
        [[2 - float((xi / xi.norm() - W[j] / W[j].norm()).norm()) for j in range(F)] for xi in x]
    )
    keep = a.topk(3, dim=-1).indices
    z_naive = torch.zeros(B, F).scatter(1, keep, a.gather(1, keep))
    decoders = {
        False: (sae.W_dec_fd.detach(), sae.b_dec_d.detach()),
        True: (sae.W_dec_text_fd.detach(), sae.b_dec_text_d.detach()),
    }
    x_hat_naive = torch.stack(
        [s * (z_naive[b] @ decoders[bool(text[b])][0] + decoders[bool(text[b])][1]) for b in range(B)]
    )
    with torch.no_grad():
        x_hat, z, aux = sae(x, modality_b=text)
    torch.testing.assert_close(z, z_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_hat_naive, rtol=1e-5, atol=1e-5)
    assert set(aux) == {"mse_vision", "mse_text"}
    torch.testing.assert_close(
        aux["mse_text"], naive_mse(x[text], x_hat_naive[text], s), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        aux["mse_vision"], naive_mse(x[~text], x_hat_naive[~text], s), rtol=1e-5, atol=1e-5
    )
    # The encoder reads directions only: scaling an input leaves its latents alone.
    torch.testing.assert_close(sae.encode(7 * x), sae.encode(x))
    assert float(z.max()) <= 2 and math.isclose(
        float(z[z > 0].min()), float(a.gather(1, keep).min()), rel_tol=1e-5
    )
