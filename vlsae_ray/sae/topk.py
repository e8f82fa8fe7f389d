"""TopK SAE with the AuxK loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator

from vlsae_ray.sae import kernels
from vlsae_ray.sae.base import Forward, SparseAutoencoder, register
from vlsae_ray.sae.config import BaseSAEConfig
from vlsae_ray.sae.kernels import SparseLatents

if TYPE_CHECKING:
    from vlsae_ray.train.parallel import ParallelLayout


class TopKConfig(BaseSAEConfig):
    architecture: Literal["topk"] = "topk"
    k: int = Field(gt=0, description="active latents per sample")
    aux_k: int | None = Field(
        default=None,
        gt=0,
        description="dead latents used by the AuxK loss; default d_in // 2 (Gao et al. 2024, App. B.1)",
    )
    auxk_coef: float = Field(default=1 / 32, ge=0, description="weight of the AuxK loss (Gao et al. 2024)")
    encoder_shortlist: int = Field(
        default=0,
        ge=0,
        description="0: the exact fp32 encoder GEMM (the reference). n > 0, on the sparse kernels: a bf16"
        " GEMM shortlists each sample's top k + n pre-activations, which are recomputed exactly in fp32"
        " before the exact top-k among them; faster where bf16 GEMMs are, and the same latents unless a"
        " true top-k entry falls outside the shortlist (see `TopKSAE.select_pre`)",
    )

    @model_validator(mode="after")
    def _check_k(self) -> TopKConfig:
        if self.k > self.n_latents:
            raise ValueError(f"k={self.k} must be at most n_latents={self.n_latents}")
        if self.aux_k is not None and self.aux_k > self.n_latents:
            raise ValueError(f"aux_k={self.aux_k} must be at most n_latents={self.n_latents}")
        return self

    @property
    def aux_k_latents(self) -> int:
        return self.aux_k if self.aux_k is not None else min(self.n_latents, max(1, self.d_in // 2))


def topk_relu(pre_bf: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU of the k largest entries of each row, zeros elsewhere (Gao et al. 2024, eq. 3)."""
    values_bk, indices_bk = pre_bf.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_bf).scatter(-1, indices_bk, values_bk.relu())


def normalized_mse(
    target_bd: torch.Tensor, prediction_bd: torch.Tensor, global_batch: ParallelLayout | None = None
) -> torch.Tensor:
    """sum ||target - prediction||^2 / sum ||target - mean(target)||^2 over the batch.

    With a data-parallel `global_batch`, this batch is one of its `data_parallel` equal parts: the
    denominator is the global batch's variance and the numerator is scaled by the number of parts,
    so the parts' mean (what averaging their gradients takes) is the global batch's normalised MSE.
    The target carries no gradient (it is the detached AuxK residual).
    """
    error = (target_bd - prediction_bd).pow(2).sum()
    if global_batch is None or global_batch.data_parallel == 1:
        return error / (target_bd - target_bd.mean(0)).pow(2).sum().clamp_min(1e-12)
    # [sum of the rows, sum of their squared norms] over the global batch, in float64 as the
    # variance is a difference: sum ||t||^2 - ||sum t||^2 / n
    target_bd = target_bd.double()
    moments = torch.cat([target_bd.sum(0), target_bd.pow(2).sum().view(1)])
    global_batch.reduce_over_data_(moments)
    rows = target_bd.shape[0] * global_batch.data_parallel
    variance = moments[-1] - moments[:-1].pow(2).sum() / rows
    return global_batch.data_parallel * error / variance.clamp_min(1e-12).to(error.dtype)


@register(TopKConfig)
class TopKSAE(SparseAutoencoder):
    """z = ReLU(TopK(W_enc (x - b_dec) + b_enc)); loss = MSE + auxk_coef * AuxK."""

    config: TopKConfig
    dictionary_from_data = True
    # Under data parallelism the trainer's layout: the AuxK loss (and BatchTopK's selection) then
    # span the global batch, so the ranks' averaged gradients are one process's.
    global_batch: ParallelLayout | None = None

    def select(self, pre_bf: torch.Tensor) -> SparseLatents:
        values_bk, indices_bk = pre_bf.topk(self.config.k, dim=-1, sorted=False)
        return SparseLatents.from_topk(values_bk, indices_bk, self.config.n_latents)

    def max_active(self, batch: int) -> int:
        return batch * self.config.k

    def select_pre(self, fwd: Forward) -> SparseLatents:
        """Per-sample top k; from a bf16 shortlist of k + `encoder_shortlist` candidates if `fwd` is one.

        The shortlist's pre-activations are recomputed exactly (O(B·(k+n)·d)), so the values are
        always exact fp32 and the selection is the exact top-k whenever the bf16 ranking keeps every
        true top-k entry among its top k + n (bf16's relative error is 2^-8, the candidates' margin
        absorbs it; measured in benchmarks/README.md).
        """
        if fwd.exact:
            return super().select_pre(fwd)
        batch, n_latents = fwd.pre_bf.shape
        n_candidates = min(n_latents, self.config.k + self.config.encoder_shortlist)
        candidates_bc = fwd.pre_bf.topk(n_candidates, dim=-1, sorted=False).indices
        candidates = SparseLatents.from_topk(candidates_bc.float(), candidates_bc, n_latents)
        exact_bc = self.exact_pre_acts(fwd, candidates).view(batch, n_candidates)
        values_bk, slots_bk = exact_bc.topk(self.config.k, dim=-1, sorted=False)
        return SparseLatents.from_topk(values_bk, candidates_bc.gather(1, slots_bk), n_latents)

    def loss_terms(self, x_bd, x_hat_bd, z, fwd, dead_mask_f):
        return {"mse": self.mse(x_bd, x_hat_bd), **self.auxk_terms(x_bd, x_hat_bd, fwd, dead_mask_f)}

    def auxk_terms(self, x_bd, x_hat_bd, fwd, dead_mask_f) -> dict[str, torch.Tensor]:
        """{"auxk": weighted AuxK loss} when latents are dead and the loss is on, else {}."""
        if dead_mask_f is None or self.config.auxk_coef == 0 or not bool(dead_mask_f.any()):
            return {}
        return {"auxk": self.config.auxk_coef * self.auxk_loss(x_bd, x_hat_bd, fwd, dead_mask_f)}

    def auxk_loss(self, x_bd, x_hat_bd, fwd, dead_mask_f) -> torch.Tensor:
        """Reconstruct the residual x - x_hat with the top aux_k dead latents (Gao et al. 2024, sec. A.2).

        The residual is detached so that only the dead latents learn from this loss; it is the
        normalised MSE of the residual, as in the paper's released code, so it is scale-free.
        Only the dead columns of the dense pre-activations are read, so its cost is O(B·dead + B·aux_k·d).
        """
        dead_f = dead_mask_f.nonzero().squeeze(-1)
        aux_k = min(self.config.aux_k_latents, dead_f.numel())
        values_bk, slots_bk = fwd.pre_bf.detach()[:, dead_f].topk(aux_k, dim=-1, sorted=False)
        pre = SparseLatents.from_topk(values_bk, dead_f[slots_bk], self.config.n_latents)
        if not fwd.exact:  # the bf16 values chose the dead latents; their values are recomputed exactly
            pre = pre.with_values(self.exact_pre_acts(fwd, pre))
        z_aux = pre.with_values(self.gathered_pre_acts(fwd, pre).relu())
        residual_bd = (x_bd - x_hat_bd).detach()
        recon_bd = kernels.decode(z_aux, self.W_dec_fd, fwd.sparse)
        return normalized_mse(residual_bd, recon_bd, self.global_batch)
