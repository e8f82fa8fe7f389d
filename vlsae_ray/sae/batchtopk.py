"""BatchTopK SAE (Bussmann, Leask and Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410).

Training keeps the k·B largest pre-activations of the whole batch, so a sample may use more or
fewer than k latents. Inference cannot depend on the batch: it keeps every pre-activation above
one global threshold θ, learned during training as a running average of the smallest kept
activation (Bussmann et al. 2024, sec. 3), which makes the inference L0 close to k.

The running average forgets its start: early batches' cutoffs are larger than the trained model's
(a fixed momentum of 0.99 left θ so high after a 64-step run that the eval L0 was 4.6 for k=32).
So the momentum at update t is min(threshold_momentum, t / (t + 10)): θ averages about the last
tenth of the updates seen so far (t = 0 sets θ to the first cutoff), and long runs reach the
configured momentum after 10 / (1 - m) updates (1000 for m = 0.99).

Under data parallelism the batch is the global batch, the data-parallel ranks' batches together
(`global_batch_topk`): every rank keeps its entries of the global top k·B and updates θ with the
global cutoff, so selection and θ are one process's on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from vlsae_ray.sae.base import register
from vlsae_ray.sae.kernels import SparseLatents
from vlsae_ray.sae.topk import TopKConfig, TopKSAE

if TYPE_CHECKING:
    from vlsae_ray.train.parallel import ParallelLayout

# Per-sample candidates for the batch-wide top k·B; a denser sample adds its entries above the cutoff.
CANDIDATE_FACTOR = 4
# Early on, θ averages about the last 1/10 of the updates so far: m_t = t / (t + 10), capped.
THRESHOLD_WINDOW_STEPS = 10


class BatchTopKConfig(TopKConfig):
    architecture: Literal["batchtopk"] = "batchtopk"
    threshold_momentum: float = Field(
        default=0.99, ge=0, lt=1, description="momentum of the running average that learns the threshold"
    )

    @model_validator(mode="after")
    def _check_shortlist(self) -> BatchTopKConfig:
        if self.encoder_shortlist:
            raise ValueError(
                f"encoder_shortlist={self.encoder_shortlist} is for per-sample TopK only; BatchTopK selects"
                " over the whole batch from the exact fp32 pre-activations: leave it at 0"
            )
        return self


def batch_topk(pre_bf: torch.Tensor, k: int) -> SparseLatents:
    """The k·B largest positive entries of `pre_bf` over the whole batch, as SparseLatents.

    Exact without sorting B·F values: pool each sample's top min(F, 4k) candidates; c, the pool's
    (k·B)-th largest, is at most the batch's. A sample whose last candidate is >= c may hold more
    entries >= c, so its entries >= c join the pool; the pool then holds every entry >= c, hence
    the batch's top k·B.
    """
    batch, n_latents = pre_bf.shape
    n_candidates = min(n_latents, CANDIDATE_FACTOR * k)
    values_bc, indices_bc = pre_bf.topk(n_candidates, dim=-1, sorted=True)
    cutoff = values_bc.flatten().topk(k * batch, sorted=False).values.min()
    saturated_b = (
        values_bc[:, -1] >= cutoff
        if n_candidates < n_latents
        else torch.zeros_like(cutoff, dtype=torch.bool).expand(batch)
    )
    rows_p, slots_p = (~saturated_b[:, None]).expand_as(values_bc).nonzero(as_tuple=True)
    indices_p, values_p = indices_bc[rows_p, slots_p], values_bc[rows_p, slots_p]
    if bool(saturated_b.any()):
        rows_s = saturated_b.nonzero().squeeze(-1)
        hit_rows, indices_s = (pre_bf[rows_s] >= cutoff).nonzero(as_tuple=True)
        rows_s = rows_s[hit_rows]
        rows_p = torch.cat([rows_p, rows_s])
        indices_p = torch.cat([indices_p, indices_s])
        values_p = torch.cat([values_p, pre_bf[rows_s, indices_s]])
    kept = values_p.topk(k * batch, sorted=False).indices
    kept = kept[values_p[kept] > 0]
    kept = kept[rows_p[kept].argsort(stable=True)]
    counts_b = torch.bincount(rows_p[kept], minlength=batch)
    offsets_b1 = torch.cat([counts_b.new_zeros(1), counts_b.cumsum(0)])
    return SparseLatents(indices_p[kept], values_p[kept], offsets_b1, n_latents)


def global_batch_topk(
    pre_bf: torch.Tensor, k: int, layout: ParallelLayout | None
) -> tuple[SparseLatents, torch.Tensor | None]:
    """This rank's entries of the global batch's top k·B·P, and the smallest kept value (None: none).

    The global batch is the `layout.data_parallel` (P) ranks' batches of B rows each, whose latents
    may be split over `layout.latent_shards` ranks; `layout` None is one process. The global top
    k·B·P holds at most k·B·P entries of one rank's block, all among that rank's own top k·B·P
    (`batch_topk`), so one all-gather of those candidates' values and one top-k over them select
    exactly what one process selects from the whole batch. Ties at the cutoff go to the lowest
    slot (rank, then candidate), so every rank agrees on the selection and the smallest value.
    """
    if layout is None or layout.data_parallel * layout.latent_shards == 1:
        pre = batch_topk(pre_bf, k)
        return pre, (pre.values_n.min() if pre.values_n.numel() else None)
    n = k * pre_bf.shape[0] * layout.data_parallel
    local = batch_topk(pre_bf, min(k * layout.data_parallel, pre_bf.shape[1]))
    values_c = F.pad(local.values_n, (0, n - local.values_n.numel()), value=-torch.inf)
    values_r = layout.gather_data(layout.gather_shards(values_c)).flatten()  # rank-major: [ranks * n]
    cutoff = values_r.topk(n, sorted=False).values.min()
    above_r, at_r = values_r > cutoff, values_r == cutoff
    kept_r = (above_r | (at_r & (at_r.cumsum(0) <= n - above_r.sum()))) & (values_r > 0)
    rank = layout.data_index * layout.latent_shards + layout.shard_index
    mine_c = kept_r.view(-1, n)[rank, : local.values_n.numel()]
    return local.select(mine_c), (values_r[kept_r].min() if bool(kept_r.any()) else None)


@register(BatchTopKConfig)
class BatchTopKSAE(TopKSAE):
    """Training: z = ReLU(BatchTopK_{k·B}(pre)); inference: z = pre · 1[pre > θ]; loss = MSE + AuxK."""

    config: BatchTopKConfig

    def __init__(self, config: BatchTopKConfig):
        super().__init__(config)
        # θ in raw units (it compares with raw pre-activations); 0 until the first training batch.
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("threshold_updates", torch.tensor(0))

    def select(self, pre_bf: torch.Tensor) -> SparseLatents:
        return self.select_over(pre_bf, self.global_batch)

    def select_over(self, pre_bf: torch.Tensor, layout: ParallelLayout | None) -> SparseLatents:
        """`select` of this rank's part of a global batch laid out by `layout` (None: the whole batch)."""
        if not self.training:
            return SparseLatents.from_mask(pre_bf, pre_bf > self.threshold)
        pre, smallest_kept = global_batch_topk(pre_bf, self.config.k, layout)
        if torch.is_grad_enabled() and smallest_kept is not None:
            self.update_threshold_(smallest_kept)
        return pre

    @torch.no_grad()
    def update_threshold_(self, smallest_kept: torch.Tensor) -> None:
        """θ <- m_t θ + (1 - m_t) min(kept), m_t = min(threshold_momentum, t / (t + 10)) at update t."""
        t = int(self.threshold_updates)
        m = min(self.config.threshold_momentum, t / (t + THRESHOLD_WINDOW_STEPS))
        self.threshold.mul_(m).add_((1 - m) * smallest_kept)
        self.threshold_updates += 1

    def max_active(self, batch: int) -> int | None:
        return batch * self.config.k if self.training else None
