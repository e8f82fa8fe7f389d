"""Reconstruction and sparsity metrics, exact over any number of batches.

`fvu(x, x_hat)` and `l0(z)` are the one-batch forms; `ReconstructionStats` accumulates the same
quantities over a stream of batches (FVU needs the dataset mean, so it keeps sufficient statistics
rather than averaging per-batch FVUs).
"""

from __future__ import annotations

import torch


def fvu(x_bd: torch.Tensor, x_hat_bd: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    x_bd, x_hat_bd = x_bd.double(), x_hat_bd.double()
    return float((x_bd - x_hat_bd).pow(2).sum() / (x_bd - x_bd.mean(0)).pow(2).sum())


def l0(z_bf: torch.Tensor) -> float:
    """Mean number of nonzero latents per sample."""
    return float((z_bf != 0).sum(-1).double().mean())


class ReconstructionStats:
    """FVU, L0 and dead latents over a stream of (x, x_hat, z) batches."""

    def __init__(self, d: int, n_latents: int):
        self.rows = 0
        self.sum_d = torch.zeros(d, dtype=torch.float64)
        self.sum_squared_norm = 0.0
        self.sum_squared_error = 0.0
        self.active = 0
        self.fired_f = torch.zeros(n_latents, dtype=torch.bool)

    def update(self, x_bd: torch.Tensor, x_hat_bd: torch.Tensor, z_bf: torch.Tensor) -> None:
        x_bd = x_bd.double()
        self.rows += x_bd.shape[0]
        self.sum_d += x_bd.sum(0)
        self.sum_squared_norm += float(x_bd.pow(2).sum())
        self.sum_squared_error += float((x_bd - x_hat_bd.double()).pow(2).sum())
        self.active += int((z_bf != 0).sum())
        self.fired_f |= (z_bf != 0).any(0).cpu()

    def fvu(self) -> float:
        # sum ||x - mean||^2 = sum ||x||^2 - N ||mean||^2
        variance = self.sum_squared_norm - float(self.sum_d.pow(2).sum()) / self.rows
        return self.sum_squared_error / variance

    def l0(self) -> float:
        return self.active / self.rows

    def dead_fraction(self) -> float:
        """Latents that never fired on any row."""
        return float((~self.fired_f).double().mean())
