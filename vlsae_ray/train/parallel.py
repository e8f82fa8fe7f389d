"""Latent sharding: one very wide SAE split by latents over a group of ranks, data parallelism on top.

Layout: world = data_parallel x latent_shards, rank r = data_index * latent_shards + shard_index.
The ranks of one *latent group* (same data_index, contiguous ranks, so one node on a GPU cluster)
hold one SAE between them and see the same batch; the ranks of one *data group* (same
shard_index) hold the same shard and see different batches, and average their gradients (DDP).

Shard s of L holds latents [s·F/L, (s+1)·F/L): rows of W_enc, b_enc and W_dec. b_dec and the
input scale are replicated. On a batch x, shard s computes its pre-activations

    pre_s = W_enc_s (x - s·b_dec) + s·b_enc_s                          [B, F/L], no communication

and picks candidates: TopK, each sample's top k of pre_s, and an all-gather of those B·k (value,
index) pairs per shard and one more top-k give exactly the selection a single process makes over
all F latents. BatchTopK selects over the global batch, every data group's batch:
`batchtopk.global_batch_topk` gathers each rank's top k·B·data_parallel candidate values over
the world (data x latent) and each rank keeps its own entries of their top k·B·data_parallel, so
the selection and the threshold are one process's. Each shard decodes its selected latents and
the partial reconstructions are summed by an all-reduce:

    x_hat = sum_s W_dec_s^T z_s + s·b_dec.

Gradients (Megatron-LM's f and g, Shoeybi et al. 2019, sec. 3): the loss is computed identically
on every rank of a latent group, so the all-reduce of the partial decodes passes gradients
through unchanged, and the centred input, used by every shard's encoder, all-reduces its
gradient (the b_dec gradient is the sum of the shards' encoder parts plus the replicated
decoder part). The AuxK loss (Gao et al. 2024, sec. A.2) selects among dead latents the same
way, normalised by the global batch's residual variance (`topk.normalized_mse`) so that the data
groups' averaged gradients are one process's; dead-latent statistics stay with the shard that
owns the latents.

Saving (`LatentShardedSAE.save`): each shard writes its own rows as one file of a sharded
checkpoint (`vlsae_ray.sae.checkpoint`), so no rank ever holds the whole SAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from vlsae_ray.sae import SparseAutoencoder, SparseLatents, build_sae, checkpoint, kernels
from vlsae_ray.sae.base import Forward
from vlsae_ray.sae.topk import TopKConfig, normalized_mse

SHARDABLE = ("topk", "batchtopk")


def check_shardable(config, latent_shards: int) -> None:
    """Raise a ValueError naming the fix unless `config`'s SAE splits into `latent_shards` latent shards."""
    if config.architecture not in SHARDABLE:
        raise ValueError(
            f"latent sharding supports {', '.join(SHARDABLE)}, not {config.architecture!r}; "
            "set training.latent_shards: 1"
        )
    if config.n_latents % latent_shards or config.n_latents // latent_shards < config.k:
        raise ValueError(
            f"n_latents={config.n_latents} must split into latent_shards={latent_shards} equal shards of at "
            f"least k={config.k} latents: make n_latents a multiple of {latent_shards} of at least "
            f"{latent_shards * config.k}, or use fewer latent_shards"
        )


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits in data_parallel x latent_shards, and the two process groups.

    A group of size 1 is never communicated over; `None` as a group means the whole world
    (torch.distributed's default group).
    """

    data_parallel: int = 1
    latent_shards: int = 1
    data_index: int = 0
    shard_index: int = 0
    data_group: object | None = None
    latent_group: object | None = None

    @property
    def data_source(self) -> int:
        """Global rank of the first member of this rank's data group (it broadcasts the initial weights)."""
        return self.shard_index

    @classmethod
    def create(cls, latent_shards: int) -> ParallelLayout:
        """The layout of this rank; every rank must call it (creating a group is collective)."""
        if not (dist.is_available() and dist.is_initialized()):
            if latent_shards != 1:
                raise ValueError(f"latent_shards={latent_shards} needs torch.distributed to be initialised")
            return cls()
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % latent_shards:
            raise ValueError(
                f"{world} workers cannot be split into groups of latent_shards={latent_shards}; "
                "make num_workers a multiple of latent_shards"
            )
        data_parallel = world // latent_shards
        if latent_shards == 1:
            return cls(data_parallel, 1, rank, 0, None, None)
        data_group = latent_group = None
        for shard in range(latent_shards):
            group = dist.new_group(list(range(shard, world, latent_shards)))
            if rank % latent_shards == shard:
                data_group = group
        for data in range(data_parallel):
            group = dist.new_group(list(range(data * latent_shards, (data + 1) * latent_shards)))
            if rank // latent_shards == data:
                latent_group = group
        if data_parallel == 1:
            data_group = None
        return cls(
            data_parallel,
            latent_shards,
            rank // latent_shards,
            rank % latent_shards,
            data_group,
            latent_group,
        )

    def sum_over_shards_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.latent_shards > 1:
            dist.all_reduce(tensor, group=self.latent_group)
        return tensor

    def gather_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """[L, *shape]: every shard's `tensor`, in shard order."""
        return _all_gather(tensor, self.latent_shards, self.latent_group)

    def gather_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """[P, *shape]: every data group member's `tensor`, in data order."""
        return _all_gather(tensor, self.data_parallel, self.data_group)

    def reduce_over_data_(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.data_parallel > 1:
            dist.all_reduce(tensor, op=op, group=self.data_group)
        return tensor


def _all_gather(tensor: torch.Tensor, size: int, group) -> torch.Tensor:
    """[size, *shape]: `tensor` of every member of `group`, in rank order (no communication for 1)."""
    if size == 1:
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


class _CopyToShards(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the latent group (Megatron's f)."""

    @staticmethod
    def forward(ctx, tensor, layout):
        ctx.layout = layout
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return ctx.layout.sum_over_shards_(grad.contiguous().clone()), None


class _SumOverShards(torch.autograd.Function):
    """All-reduce forward; identity backward, as the loss is replicated over the group (Megatron's g)."""

    @staticmethod
    def forward(ctx, tensor, layout):
        return layout.sum_over_shards_(tensor.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class LatentShardedSAE(nn.Module):
    """This rank's shard of a TopK or BatchTopK SAE; together the group computes the full SAE exactly.

    `local` is an ordinary SAE of F/L latents holding this shard's parameters (so the kernels,
    the unit-norm constraint and the data-dependent init are the library's own); `config` is the
    full SAE's. `forward` has the signature of `SparseAutoencoder.forward` and returns this
    shard's latents (indices local to the shard) with the full reconstruction and loss.
    """

    def __init__(self, config: TopKConfig, layout: ParallelLayout, seed: int = 0):
        super().__init__()
        check_shardable(config, layout.latent_shards)
        shards = layout.latent_shards
        self.config, self.layout = config, layout
        self.n_local = config.n_latents // shards
        self.offset = layout.shard_index * self.n_local
        # Each shard draws its own initial weights: no rank ever holds the full [F, d] matrices.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + layout.shard_index)
            self.local = build_sae(config.model_copy(update={"n_latents": self.n_local, "aux_k": None}))

    @classmethod
    def shard_of(cls, full: SparseAutoencoder, layout: ParallelLayout) -> LatentShardedSAE:
        """This rank's shard of an existing full SAE (same weights, buffers and init)."""
        sharded = cls(full.config, layout)
        rows = slice(sharded.offset, sharded.offset + sharded.n_local)
        state = {
            name: tensor[rows] if checkpoint.latent_tensor(name) else tensor
            for name, tensor in full.state_dict().items()
        }
        sharded.local.load_state_dict(state)
        return sharded

    def full_sae(self) -> SparseAutoencoder:
        """The whole SAE, gathered from the group (collective: every rank of the group calls it).

        Every rank then holds all F latents: for tests and small SAEs; `save` writes without it.
        """
        full = build_sae(self.config).to(self.local.b_dec_d.device)
        state = {}
        for name, tensor in self.local.state_dict().items():
            if checkpoint.latent_tensor(name):
                tensor = self.layout.gather_shards(tensor).flatten(0, 1)
            state[name] = tensor
        full.load_state_dict(state)
        return full

    def save(self, uri: str) -> None:
        """Save the whole SAE under `uri` as a sharded checkpoint, each rank writing its own shard.

        Collective over the latent group: every rank of one group (one data index) calls it. No rank
        gathers the others' weights; the group gathers the files' records and shard 0's rank commits
        them (`vlsae_ray.sae.checkpoint`). `SparseAutoencoder.load(uri)` gives the full SAE.
        """
        rows = (self.offset, self.offset + self.n_local)
        shard, shards = self.layout.shard_index, self.layout.latent_shards
        record = checkpoint.write_shard(uri, shard, shards, rows, self.local.folded_state_dict())
        records = [None] * shards
        dist.all_gather_object(records, record, group=self.layout.latent_group)  # every shard is written
        if shard == 0:
            checkpoint.commit_sharded(uri, self.config.model_dump_json(indent=2), records)

    # The SAE interface the trainer uses, on the local shard.
    @property
    def b_dec_d(self) -> torch.Tensor:
        return self.local.b_dec_d

    def sharded_parameters(self) -> list[nn.Parameter]:
        return [self.local.W_enc_fd, self.local.b_enc_f, self.local.W_dec_fd]

    def init_from_data(self, sample_nd: torch.Tensor) -> None:
        self.local.init_from_data(sample_nd)

    def normalize_decoder_(self) -> None:
        self.local.normalize_decoder_()

    def remove_parallel_grads_(self) -> None:
        self.local.remove_parallel_grads_()

    def forward(
        self, x_bd: torch.Tensor, dead_mask_f: torch.Tensor | None = None, *, sparse_latents: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | SparseLatents, dict[str, torch.Tensor]]:
        sae = self.local
        sae.check_width(x_bd)
        batch, s = x_bd.shape[0], sae.input_scale
        centred_bd = _CopyToShards.apply(x_bd - s * sae.b_dec_d, self.layout)
        # The kernel choice of the full SAE, so every shard and a single process take the same path.
        sparse = kernels.use_sparse(self.config.k * batch, batch, self.config.n_latents)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse):
            pre_bf = torch.addmm(s * sae.b_enc_f, centred_bd, sae.W_enc_fd.T)
        fwd = Forward(centred_bd, pre_bf, sparse)
        pre = self._select(pre_bf.detach())
        z = pre.with_values(sae.activate(pre.with_values(sae.gathered_pre_acts(fwd, pre))))
        partial_bd = kernels.decode(z, sae.W_dec_fd, sparse)
        x_hat_bd = _SumOverShards.apply(partial_bd, self.layout) + s * sae.b_dec_d
        aux = {"mse": sae.mse(x_bd, x_hat_bd), **self._auxk_terms(x_bd, x_hat_bd, fwd, dead_mask_f)}
        return x_hat_bd, (z if sparse_latents else z.to_dense()), aux

    def _select(self, pre_bf: torch.Tensor) -> SparseLatents:
        if self.config.architecture == "batchtopk":  # training: the global batch's top k·B; else θ
            return self.local.select_over(pre_bf, self.layout)
        values_bk, indices_bk = pre_bf.topk(self.config.k, dim=-1, sorted=False)
        return self._global_topk(values_bk, indices_bk, self.config.k)

    def _global_topk(self, values_bk: torch.Tensor, indices_bk: torch.Tensor, k: int) -> SparseLatents:
        """Each sample's top k over all shards' candidates [B, k] (local indices), as this shard's entries."""
        batch = values_bk.shape[0]
        values_bc = self.layout.gather_shards(values_bk).permute(1, 0, 2).reshape(batch, -1)
        latents_bc = self.layout.gather_shards(indices_bk + self.offset).permute(1, 0, 2).reshape(batch, -1)
        top_bk, slots_bk = values_bc.topk(k, dim=-1, sorted=False)
        rows_bk = torch.arange(batch, device=values_bk.device)[:, None].expand_as(slots_bk)
        latents_bk = latents_bc.gather(1, slots_bk)
        return self._own_entries(rows_bk.flatten(), latents_bk.flatten(), top_bk.flatten(), batch)

    def _own_entries(self, rows_n, latents_n, values_n, batch: int) -> SparseLatents:
        mine_n = (latents_n >= self.offset) & (latents_n < self.offset + self.n_local)
        rows_n, latents_n, values_n = rows_n[mine_n], latents_n[mine_n] - self.offset, values_n[mine_n]
        order_n = rows_n.argsort(stable=True)
        counts_b = torch.bincount(rows_n, minlength=batch)
        offsets_b1 = torch.cat([counts_b.new_zeros(1), counts_b.cumsum(0)])
        return SparseLatents(latents_n[order_n], values_n[order_n], offsets_b1, self.n_local)

    def _auxk_terms(self, x_bd, x_hat_bd, fwd: Forward, dead_mask_f) -> dict[str, torch.Tensor]:
        """The AuxK loss over the dead latents of every shard, as `TopKSAE.auxk_loss` computes it."""
        if dead_mask_f is None or self.config.auxk_coef == 0:
            return {}
        n_dead = int(self.layout.sum_over_shards_(dead_mask_f.sum()))
        if n_dead == 0:
            return {}
        aux_k = min(self.config.aux_k_latents, n_dead)
        dead_f = dead_mask_f.nonzero().squeeze(-1)
        values_bk, slots_bk = fwd.pre_bf.detach()[:, dead_f].topk(min(aux_k, dead_f.numel()), dim=-1)
        pad = aux_k - values_bk.shape[1]  # a shard with few dead latents offers -inf in their place
        values_bk = torch.nn.functional.pad(values_bk, (0, pad), value=-torch.inf)
        indices_bk = torch.nn.functional.pad(dead_f[slots_bk], (0, pad))
        pre = self._global_topk(values_bk, indices_bk, aux_k)
        sae = self.local
        z_aux = pre.with_values(sae.gathered_pre_acts(fwd, pre).relu())
        recon_bd = _SumOverShards.apply(kernels.decode(z_aux, sae.W_dec_fd, fwd.sparse), self.layout)
        residual_bd = (x_bd - x_hat_bd).detach()
        return {"auxk": self.config.auxk_coef * normalized_mse(residual_bd, recon_bd, self.layout)}
