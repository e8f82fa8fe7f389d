"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders", arXiv 2407.14435).

z_j = pre_j · H(pre_j - θ_j) with a learned threshold θ_j > 0 per latent, and loss MSE + λ L0.
The step H has no useful gradient, so θ learns through straight-through estimators with a
rectangle kernel K of bandwidth ε (paper, eqs. 11-12):
    ∂JumpReLU/∂θ = -(θ/ε) K((pre - θ)/ε),      ∂H/∂θ = -(1/ε) K((pre - θ)/ε),
while ∂z/∂pre = H(pre - θ) and the L0 term sends no gradient to pre. θ and ε are in normalised
units (θ = exp(log_threshold)); raw pre-activations compare with s θ.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from vlsae_ray.sae.base import SparseAutoencoder, register
from vlsae_ray.sae.config import BaseSAEConfig
from vlsae_ray.sae.kernels import SparseLatents


class JumpReLUConfig(BaseSAEConfig):
    architecture: Literal["jumprelu"] = "jumprelu"
    l0_coefficient: float = Field(default=1e-3, gt=0, description="λ, the weight of the L0 penalty")
    bandwidth: float = Field(default=1e-3, gt=0, description="ε, the width of the STE's rectangle kernel")
    initial_threshold: float = Field(default=1e-3, gt=0, description="θ at initialisation (paper: 0.001)")


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return (pre > threshold) * grad, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, -(1 / eps) * _rectangle((pre - threshold) / eps) * grad, None


@register(JumpReLUConfig)
class JumpReLUSAE(SparseAutoencoder):
    config: JumpReLUConfig

    def __init__(self, config: JumpReLUConfig):
        super().__init__(config)
        self.log_threshold_f = nn.Parameter(torch.full((config.n_latents,), config.initial_threshold).log())

    def select(self, pre_bf: torch.Tensor) -> SparseLatents:
        # Also keep the entries just below θ, inside the kernel's window: they carry θ's gradient.
        window_f = 0.5 * self.config.bandwidth if self.training else 0.0
        floor_f = self.input_scale * (self.log_threshold_f.detach().exp() - window_f)
        return SparseLatents.from_mask(pre_bf, pre_bf > floor_f)

    def activate(self, pre: SparseLatents) -> torch.Tensor:
        s = self.input_scale
        threshold_n = self.log_threshold_f.exp()[pre.indices_n]
        return s * _JumpReLU.apply(pre.values_n / s, threshold_n, self.config.bandwidth)

    def loss_terms(self, x_bd, x_hat_bd, z, fwd, dead_mask_f):
        # z holds the entries inside the window below θ too (as zeros): they count for θ's gradient.
        pre_n = fwd.pre_bf.detach()[z.rows_n, z.indices_n].float()  # the count in fp32 under bf16
        threshold_n = self.log_threshold_f.exp()[z.indices_n]
        l0 = _Step.apply(pre_n / self.input_scale, threshold_n, self.config.bandwidth).sum()
        return {"mse": self.mse(x_bd, x_hat_bd), "l0": self.config.l0_coefficient * l0 / z.batch_size}

    @torch.no_grad()
    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().folded_state_dict()
        state["log_threshold_f"] = self.log_threshold_f + self.input_scale.log()
        return state
