import torch

from vlsae_ray.sae import build_sae
from vlsae_ray.sae.init import geometric_median, input_scale


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
