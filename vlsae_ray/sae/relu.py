"""ReLU SAE with an L1 penalty (Bricken et al. 2023, "Towards Monosemanticity")."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from vlsae_ray.sae.base import SparseAutoencoder, register
from vlsae_ray.sae.config import BaseSAEConfig
from vlsae_ray.sae.kernels import SparseLatents


class ReLUConfig(BaseSAEConfig):
    architecture: Literal["relu"] = "relu"
    l1_coefficient: float = Field(
        default=0.1, gt=0, description="weight of the L1 penalty on latents in normalised units"
    )


@register(ReLUConfig)
class ReLUSAE(SparseAutoencoder):
    """z = ReLU(W_enc (x - b_dec) + b_enc); loss = MSE + l1_coefficient * sum_j z_j ||W_dec_j||.

    The L1 term is weighted by decoder column norms (Anthropic, "Circuits Updates - April 2024");
    with the unit-norm constraint this equals the plain L1 of Bricken et al. 2023, but it keeps
    the penalty honest (latents cannot shrink by growing their column) between renormalisations.
    """

    config: ReLUConfig

    def select(self, pre_bf: torch.Tensor) -> SparseLatents:
        return SparseLatents.from_mask(pre_bf, pre_bf > 0)

    def loss_terms(self, x_bd, x_hat_bd, z, fwd, dead_mask_f):
        column_norms_n = self.W_dec_fd.norm(dim=-1)[z.indices_n]
        l1 = (z.values_n * column_norms_n).sum() / (z.batch_size * self.input_scale)
        return {"mse": self.mse(x_bd, x_hat_bd), "l1": self.config.l1_coefficient * l1}
