"""Activations with planted sparse features: a known dictionary to recover (tests, benchmarks).

x = sum_i c_i f_i + offset + noise: the f_i are random unit vectors, feature i is on in a sample
with probability p_i ∝ (i + 1)^-alpha (a power law, scaled so `active` features are on per sample
on average), its coefficient c_i is uniform in [0.5, 1.5], and Gaussian noise carries a fraction
`noise_fvu` of the variance, so that fraction is the best FVU any SAE can reach.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Planted(NamedTuple):
    x_nd: torch.Tensor
    features_md: torch.Tensor  # the true dictionary, unit rows
    frequencies_m: torch.Tensor  # p_i


def planted_features(
    n: int,
    d: int,
    n_features: int,
    *,
    active: float,
    alpha: float = 0.5,
    noise_fvu: float = 0.08,
    offset_norm: float = 3.0,
    seed: int = 0,
    chunk: int = 4096,
) -> Planted:
    # Salted, so that the dictionary is not the stream torch.manual_seed(seed) gives an SAE's init.
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    features_md = torch.randn(n_features, d, generator=g)
    features_md /= features_md.norm(dim=-1, keepdim=True)
    frequencies_m = (torch.arange(n_features) + 1.0).pow(-alpha)
    frequencies_m = (frequencies_m * active / frequencies_m.sum()).clamp_max(1.0)
    offset_d = torch.randn(d, generator=g)
    offset_d *= offset_norm / offset_d.norm()
    x_nd = torch.empty(n, d)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        on_rm = torch.rand(rows, n_features, generator=g) < frequencies_m
        coefficients_rm = on_rm * (0.5 + torch.rand(rows, n_features, generator=g))
        x_nd[start : start + rows] = coefficients_rm @ features_md
    # Signal variance per sample is E||c f||^2 minus the mean's; noise adds noise_fvu of the total.
    signal_variance = (x_nd - x_nd.mean(0)).pow(2).sum(-1).mean()
    noise_std = (noise_fvu / (1 - noise_fvu) * signal_variance / d).sqrt()
    x_nd += offset_d + noise_std * torch.randn(n, d, generator=g)
    return Planted(x_nd, features_md, frequencies_m)


def recovered_fraction(features_md: torch.Tensor, decoder_fd: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of true features whose best-matching decoder column has cosine above `threshold`."""
    unit_fd = decoder_fd / decoder_fd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best_m = torch.cat([(part @ unit_fd.T).max(-1).values for part in features_md.split(1024)])
    return float((best_m > threshold).float().mean())
