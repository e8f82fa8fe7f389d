"""Matryoshka BatchTopK SAE (Nabeshima 2024, "Matryoshka Sparse Autoencoders"; Bussmann et al. 2025,
"Learning Multi-Level Features with Matryoshka Sparse Autoencoders", arXiv 2503.17547).

The dictionary is split into nested prefixes: group 1, groups 1-2, ..., all groups. Each prefix
must reconstruct the input on its own (its cumulative reconstruction uses only its latents), so
early latents learn general features and later ones refine them. The loss averages the prefixes'
MSEs with configurable weights; latents are selected by BatchTopK over the whole dictionary.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from vlsae_ray.sae import kernels
from vlsae_ray.sae.base import register
from vlsae_ray.sae.batchtopk import BatchTopKConfig, BatchTopKSAE


class MatryoshkaConfig(BatchTopKConfig):
    architecture: Literal["matryoshka_batchtopk"] = "matryoshka_batchtopk"
    group_fractions: tuple[float, ...] = Field(
        default=(1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2),
        description="fraction of the latents in each nested group, in order; they sum to 1",
    )
    group_weights: tuple[float, ...] | None = Field(
        default=None, description="weight of each prefix's MSE in the loss; default equal weights"
    )

    @model_validator(mode="after")
    def _check_groups(self) -> MatryoshkaConfig:
        if not self.group_fractions or any(f <= 0 for f in self.group_fractions):
            raise ValueError(f"group_fractions={self.group_fractions} must be positive fractions")
        if not math.isclose(sum(self.group_fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"group_fractions={self.group_fractions} must sum to 1")
        if self.group_weights is not None and (
            len(self.group_weights) != len(self.group_fractions) or any(w < 0 for w in self.group_weights)
        ):
            raise ValueError(
                f"group_weights={self.group_weights} must be {len(self.group_fractions)} non-negative weights"
            )
        if len(set(self.group_ends)) != len(self.group_ends):
            raise ValueError(
                f"group_fractions={self.group_fractions} leave an empty group at n_latents={self.n_latents}"
            )
        return self

    @property
    def group_ends(self) -> list[int]:
        """The end (exclusive) of each prefix, in latents."""
        ends = [round(self.n_latents * f) for f in itertools.accumulate(self.group_fractions)]
        ends[-1] = self.n_latents
        return ends


@register(MatryoshkaConfig)
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK latents; loss = sum_m w_m MSE(x, b_dec + sum over latents < end_m) / sum_m w_m + AuxK."""

    config: MatryoshkaConfig

    def loss_terms(self, x_bd, x_hat_bd, z, fwd, dead_mask_f):
        ends = torch.tensor(self.config.group_ends, device=z.indices_n.device)
        weights = self.config.group_weights or (1.0,) * len(ends)
        group_n = torch.bucketize(z.indices_n, ends, right=True)
        prefix_bd = (self.input_scale * self.b_dec_d).expand_as(x_bd)
        mse = x_bd.new_zeros(())
        for group, weight in enumerate(weights):
            prefix_bd = prefix_bd + kernels.decode(z.select(group_n == group), self.W_dec_fd, fwd.sparse)
            mse = mse + weight * self.mse(x_bd, prefix_bd)
        return {"mse": mse / sum(weights), **self.auxk_terms(x_bd, x_hat_bd, fwd, dead_mask_f)}
