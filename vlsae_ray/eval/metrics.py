"""Reconstruction and sparsity metrics, exact over any number of batches.

`fvu(x, x_hat)` and `l0(z)` are the one-batch forms; `ReconstructionStats` accumulates the same
quantities over a stream of batches (FVU needs the dataset mean, so it keeps sufficient statistics
rather than averaging per-batch FVUs), from the SAE's sparse latents (never a dense [B, F]).
"""

from __future__ import annotations

import math

import torch

from vlsae_ray.sae.kernels import SparseLatents


def fvu(x_bd: torch.Tensor, x_hat_bd: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    x_bd, x_hat_bd = x_bd.double(), x_hat_bd.double()
    return float((x_bd - x_hat_bd).pow(2).sum() / (x_bd - x_bd.mean(0)).pow(2).sum())


def l0(z_bf: torch.Tensor) -> float:
    """Mean number of nonzero latents per sample."""
    return float((z_bf != 0).sum(-1).double().mean())


class ReconstructionStats:
    """FVU, L0 and dead latents over a stream of (x, x_hat, latents) batches; `merge` adds another's."""

    def __init__(self, d: int, n_latents: int, n_prefixes: int = 0):
        self.rows = 0
        self.sum_d = torch.zeros(d, dtype=torch.float64)
        self.sum_squared_norm = 0.0
        self.sum_squared_error = 0.0
        self.active = 0
        self.fired_f = torch.zeros(n_latents, dtype=torch.bool)
        # Matryoshka: squared error of each nested prefix's own reconstruction
        self.prefix_squared_error_g = torch.zeros(n_prefixes, dtype=torch.float64)

    def update(self, x_bd: torch.Tensor, x_hat_bd: torch.Tensor, z: SparseLatents) -> None:
        x_bd = x_bd.double()
        self.rows += x_bd.shape[0]
        self.sum_d += x_bd.sum(0).cpu()
        self.sum_squared_norm += float(x_bd.pow(2).sum())
        self.sum_squared_error += float((x_bd - x_hat_bd.double()).pow(2).sum())
        fired_n = z.indices_n[z.values_n != 0]
        self.active += fired_n.numel()
        self.fired_f[fired_n.cpu()] = True

    def update_prefixes(self, x_bd: torch.Tensor, x_hat_prefixes_gbd: list[torch.Tensor]) -> None:
        for g, x_hat_bd in enumerate(x_hat_prefixes_gbd):
            self.prefix_squared_error_g[g] += float((x_bd.double() - x_hat_bd.double()).pow(2).sum())

    def merge(self, other: ReconstructionStats) -> None:
        self.rows += other.rows
        self.sum_d += other.sum_d
        self.sum_squared_norm += other.sum_squared_norm
        self.sum_squared_error += other.sum_squared_error
        self.active += other.active
        self.fired_f |= other.fired_f
        self.prefix_squared_error_g += other.prefix_squared_error_g

    def _variance(self) -> float:
        # sum ||x - mean||^2 = sum ||x||^2 - N ||mean||^2
        return self.sum_squared_norm - float(self.sum_d.pow(2).sum()) / self.rows

    def fvu(self) -> float:
        return self.sum_squared_error / self._variance()

    def prefix_fvu(self) -> list[float]:
        """FVU of each nested prefix's reconstruction (Matryoshka groups 1, 1-2, ..., all)."""
        return (self.prefix_squared_error_g / self._variance()).tolist()

    def l0(self) -> float:
        return self.active / self.rows

    def dead_fraction(self) -> float:
        """Latents that never fired on any row."""
        return float((~self.fired_f).double().mean())


def nan_to_none(values: torch.Tensor) -> list[float | None]:
    """A tensor as a JSON-ready list, NaN (an undefined score) as None."""
    return [None if math.isnan(value) else value for value in values.tolist()]
