"""Initialisation from data: the input scale and the geometric median of a sample."""

from __future__ import annotations

import torch


def input_scale(sample_nd: torch.Tensor) -> float:
    """sqrt(mean ||x||^2) over the sample, so that x / scale has mean squared norm 1."""
    scale = sample_nd.float().pow(2).sum(-1).mean().sqrt().item()
    if not scale > 0:
        raise ValueError("the init sample is all zeros: cannot derive an input scale from it")
    return scale


def geometric_median(points_nd: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to `points_nd`, by Weiszfeld iterations.

    Weiszfeld (1937): y <- sum_i w_i x_i / sum_i w_i with w_i = 1 / ||x_i - y||, started at the
    mean. Distances are floored at a tiny epsilon so an iterate landing on a data point stays finite.
    """
    points_nd = points_nd.double()
    median_d = points_nd.mean(0)
    for _ in range(max_iter):
        weights_n = 1.0 / (points_nd - median_d).norm(dim=-1).clamp_min(1e-12)
        update_d = (weights_n[:, None] * points_nd).sum(0) / weights_n.sum()
        shift = (update_d - median_d).norm()
        median_d = update_d
        if shift <= tol * median_d.norm().clamp_min(1.0):
            break
    return median_d.float()
