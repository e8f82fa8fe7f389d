import torch

from vlsae_ray.sae import build_sae
from vlsae_ray.sae.init import geometric_median, init_dictionary_from_data, input_scale


def test_geometric_median_of_symmetric_points_is_their_centre():
    torch.manual_seed(0)
    centre = torch.tensor([1.0, -2.0, 3.0])
    offsets = torch.randn(20, 3)
    points = torch.cat([centre + offsets, centre - offsets])
    torch.testing.assert_close(geometric_median(points), centre, atol=1e-4, rtol=0)


def test_geometric_median_matches_brute_force_and_resists_outliers():
    torch.manual_seed(0)
    points = torch.cat([torch.randn(8, 2), torch.tensor([[40.0, 40.0]])])  # one far outlier
    median = geometric_median(points)

    def cost(y):
        return (points.double() - y.double()).norm(dim=-1).sum()

    grid = torch.stack(
        torch.meshgrid(torch.linspace(-3, 3, 601), torch.linspace(-3, 3, 601), indexing="ij"), -1
    )
    costs = (points.double()[:, None, None] - grid.double()[None]).norm(dim=-1).sum(0)
    best = grid.reshape(-1, 2)[costs.argmin()]
    assert cost(median) <= costs.min() + 1e-9
    torch.testing.assert_close(median, best, atol=0.02, rtol=0)
    assert median.norm() < 2  # the mean is pulled to ~(4.4, 4.4) by the outlier
    assert points.mean(0).norm() > 5


def test_init_from_data_scales_inputs_to_unit_mean_squared_norm():
    torch.manual_seed(0)
    sample = 7.0 * torch.randn(500, 8) + 3.0
    sae = build_sae({"architecture": "topk", "d_in": 8, "n_latents": 32, "k": 4})
    sae.init_from_data(sample)
    s = float(sae.input_scale)
    assert s == input_scale(sample)
    torch.testing.assert_close((sample / s).pow(2).sum(-1).mean(), torch.tensor(1.0))
    torch.testing.assert_close(sae.b_dec_d.detach(), geometric_median(sample / s))
    # In raw units the decoder bias sits at the raw sample's geometric median.
    torch.testing.assert_close(s * sae.b_dec_d.detach(), geometric_median(sample), rtol=1e-4, atol=1e-4)


def _naive_topk_error(sample, s, b_dec, W_enc, W_dec, k):
    """Sum of squared errors of a per-sample TopK SAE with b_enc = 0, written out densely."""
    centred = sample - s * b_dec
    pre = centred @ W_enc.T
    values, indices = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    return float((centred - z @ W_dec).pow(2).sum())


def test_dictionary_from_data_starts_at_sample_rows_with_the_least_squares_encoder_gain():
    torch.manual_seed(0)
    sample = 4.0 * torch.randn(48, 16) + 1.0
    sae = build_sae({"architecture": "topk", "d_in": 16, "n_latents": 64, "k": 4})
    random_tail = sae.W_dec_fd.detach()[48:].clone()
    sae.init_from_data(sample)
    init_dictionary_from_data(sae, sample)
    s, b_dec = float(sae.input_scale), sae.b_dec_d.detach()
    W_enc, W_dec = sae.W_enc_fd.detach(), sae.W_dec_fd.detach()

    rows = sample / s - b_dec
    torch.testing.assert_close(W_dec[:48], rows / rows.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(W_dec[48:], random_tail)  # latents past the sample keep their directions
    gain = W_enc.norm(dim=-1)
    torch.testing.assert_close(W_enc, gain[:, None] * W_dec)  # the encoder is the transposed decoder...
    torch.testing.assert_close(gain, gain[:1].expand(64))  # ...times one gain
    # That gain minimises the sample's reconstruction error (checked on a grid around it).
    error = [
        _naive_topk_error(sample, s, b_dec, g * W_dec, W_dec, 4)
        for g in gain[0] * torch.linspace(0.5, 1.5, 41)
    ]
    assert min(range(41), key=error.__getitem__) == 20
    assert error[20] < _naive_topk_error(sample, s, b_dec, W_dec, W_dec, 4)  # better than gain 1


def test_dictionary_from_data_leaves_the_relu_sae_random():
    torch.manual_seed(0)
    sample = torch.randn(64, 8)
    sae = build_sae({"architecture": "relu", "d_in": 8, "n_latents": 32})
    before = {name: t.detach().clone() for name, t in sae.named_parameters() if name.startswith("W_")}
    sae.init_from_data(sample)
    init_dictionary_from_data(sae, sample)
    for name, tensor in before.items():
        torch.testing.assert_close(getattr(sae, name).detach(), tensor)


def test_dictionary_from_data_skips_repeated_sample_rows():
    torch.manual_seed(0)
    distinct = torch.randn(6, 8)
    sample = distinct[[0, 1, 0, 2, 1, 3, 4, 0, 5]]  # 9 rows, 6 distinct, first seen in order 0..5
    sae = build_sae({"architecture": "topk", "d_in": 8, "n_latents": 16, "k": 2})
    sae.init_from_data(sample)
    init_dictionary_from_data(sae, sample)
    rows = distinct / float(sae.input_scale) - sae.b_dec_d.detach()
    torch.testing.assert_close(sae.W_dec_fd.detach()[:6], rows / rows.norm(dim=-1, keepdim=True))
    cosines = sae.W_dec_fd.detach() @ sae.W_dec_fd.detach().T
    assert float((cosines - torch.eye(16)).abs().max()) < 0.999  # no two latents start identical
