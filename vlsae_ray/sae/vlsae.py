"""VL-SAE: one sparse autoencoder for vision and text (arXiv 2510.21323, NeurIPS 2025).

Encoder: a distance-based activation with no bias, a_j = 2 - || x/||x|| - w_j/||w_j|| ||_2
(= 2 - sqrt(2 - 2 cos(x, w_j))), then per-sample TopK. Both modalities share the encoder, so a
concept is one latent whether it shows up in an image or in a caption; each modality has its own
linear decoder with bias, and the loss is MSE(x_v, D_v z_v) + MSE(x_t, D_t z_t) (paper, sec. 3).
Rows are vision or text, paired or not: `modality_b` (True = text) says which decoder a row uses.

The latents depend only on the direction of x and lie in [0, 2], so they carry no scale: the
decoder columns carry it and are not normalised; the input scale s enters the decoders only
(x_hat = s (D z + b)) and `save` folds it into them.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from vlsae_ray.sae import kernels
from vlsae_ray.sae.base import Forward, SparseAutoencoder, register
from vlsae_ray.sae.config import BaseSAEConfig
from vlsae_ray.sae.init import geometric_median, input_scale
from vlsae_ray.sae.kernels import SparseLatents


class VLSAEConfig(BaseSAEConfig):
    architecture: Literal["vl_sae"] = "vl_sae"
    k: int = Field(gt=0, description="active latents per sample")

    @model_validator(mode="after")
    def _check_k(self) -> VLSAEConfig:
        if self.k > self.n_latents:
            raise ValueError(f"k={self.k} must be at most n_latents={self.n_latents}")
        return self


def distance_activation(cos_n: torch.Tensor) -> torch.Tensor:
    """2 - ||x̂ - ŵ|| from cos(x, w): ||x̂ - ŵ||^2 = 2 - 2 cos. Floored so sqrt's gradient stays finite."""
    return 2 - (2 - 2 * cos_n).clamp_min(1e-12).sqrt()


@register(VLSAEConfig)
class VLSAE(SparseAutoencoder):
    """W_enc_fd: encoder directions; W_dec_fd, b_dec_d: vision decoder; W_dec_text_fd, b_dec_text_d: text."""

    config: VLSAEConfig
    unit_norm_decoder: ClassVar[bool] = False
    has_encoder_bias: ClassVar[bool] = False

    def __init__(self, config: VLSAEConfig):
        super().__init__(config)
        with torch.no_grad():
            # Tied start, scaled so that k latents of about 1 give a reconstruction of about unit norm.
            self.W_dec_fd.mul_(1 / config.k**0.5)
        self.W_dec_text_fd = nn.Parameter(self.W_dec_fd.detach().clone())
        self.b_dec_text_d = nn.Parameter(torch.zeros(config.d_in))

    def select(self, pre_bf: torch.Tensor) -> SparseLatents:
        values_bk, indices_bk = pre_bf.topk(self.config.k, dim=-1, sorted=False)
        return SparseLatents.from_topk(values_bk, indices_bk, self.config.n_latents)

    def activate(self, pre: SparseLatents) -> torch.Tensor:
        return distance_activation(pre.values_n)

    def max_active(self, batch: int) -> int:
        return batch * self.config.k

    def encoder_pass(self, x_bd: torch.Tensor) -> Forward:
        """Cosines [B, F] of the inputs with the encoder directions (the `pre_bf` of this SAE)."""
        sparse = kernels.use_sparse(self.max_active(x_bd.shape[0]), x_bd.shape[0], self.config.n_latents)
        unit_bd = x_bd / x_bd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse):
            cos_bf = unit_bd @ self.unit_encoder().T
        return Forward(unit_bd, cos_bf, sparse)

    def unit_encoder(self) -> torch.Tensor:
        return self.W_enc_fd / self.W_enc_fd.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def pre_acts(self, x_bd: torch.Tensor) -> torch.Tensor:
        self.check_width(x_bd)
        return self.encoder_pass(x_bd).pre_bf

    def gathered_pre_acts(self, fwd: Forward, pre: SparseLatents) -> torch.Tensor:
        return kernels.gathered_dot(pre, fwd.centred_bd, self.unit_encoder(), fwd.pre_bf, fwd.sparse)

    def decode(self, z_bf: torch.Tensor, modality: Literal["vision", "text"] = "vision") -> torch.Tensor:
        W_fd, b_d = (
            (self.W_dec_text_fd, self.b_dec_text_d) if modality == "text" else (self.W_dec_fd, self.b_dec_d)
        )
        return self.input_scale * (z_bf @ W_fd + b_d)

    def forward(self, x_bd, dead_mask_f=None, *, sparse_latents=False, modality_b=None):
        """(x_hat_bd, z, aux); `modality_b` [B] bool marks text rows (default: all vision)."""
        self.check_width(x_bd)
        text_b = (
            torch.zeros(x_bd.shape[0], dtype=torch.bool, device=x_bd.device)
            if modality_b is None
            else modality_b
        )
        fwd = self.encoder_pass(x_bd)._replace(text_b=text_b)
        pre = self.select(fwd.pre_bf.detach())
        z = pre.with_values(self.activate(pre.with_values(self.gathered_pre_acts(fwd, pre))))
        s = self.input_scale
        x_hat_vision_bd = s * (kernels.decode(z, self.W_dec_fd, fwd.sparse) + self.b_dec_d)
        x_hat_text_bd = s * (kernels.decode(z, self.W_dec_text_fd, fwd.sparse) + self.b_dec_text_d)
        x_hat_bd = torch.where(text_b[:, None], x_hat_text_bd, x_hat_vision_bd)
        aux = self.loss_terms(x_bd, x_hat_bd, z, fwd, dead_mask_f)
        return x_hat_bd, (z if sparse_latents else z.to_dense()), aux

    def loss_terms(self, x_bd, x_hat_bd, z, fwd, dead_mask_f):
        """MSE of each modality present in the batch, each a mean over that modality's rows."""
        terms = {}
        for name, rows_b in (("mse_vision", ~fwd.text_b), ("mse_text", fwd.text_b)):
            if bool(rows_b.any()):
                terms[name] = self.mse(x_bd[rows_b], x_hat_bd[rows_b])
        return terms

    @torch.no_grad()
    def init_from_data(self, sample_nd: torch.Tensor, modality_n: torch.Tensor | None = None) -> None:
        """Input scale from all rows; each decoder bias at its modality's geometric median."""
        sample_nd = sample_nd.to(self.b_dec_d.device, torch.float32)
        if sample_nd.ndim != 2 or sample_nd.shape[1] != self.config.d_in:
            raise ValueError(
                f"the init sample has shape {tuple(sample_nd.shape)}; expected [N, {self.config.d_in}]"
            )
        text_n = torch.zeros(len(sample_nd), dtype=torch.bool) if modality_n is None else modality_n.cpu()
        scale = input_scale(sample_nd)
        self.input_scale.fill_(scale)
        for rows_n, bias_d in ((~text_n, self.b_dec_d), (text_n, self.b_dec_text_d)):
            if bool(rows_n.any()):
                bias_d.copy_(geometric_median(sample_nd[rows_n.to(sample_nd.device)] / scale))

    @torch.no_grad()
    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().folded_state_dict()
        s = self.input_scale
        for name in ("W_dec_fd", "W_dec_text_fd", "b_dec_d", "b_dec_text_d"):
            state[name] = s * getattr(self, name)
        return state
