"""One SAE optimisation step, shared by `fit_local` and the distributed Ray Train loop.

No Ray here: the Ray Train loop wraps the SAE (or its latent shard, `parallel.LatentShardedSAE`)
in DistributedDataParallel over the data-parallel group and calls `SAETrainer.step` on each
worker's batch. The forward goes through `model(x)` so DDP averages gradients; SAE-specific
methods go through `model.module`. With a `ParallelLayout`, the data-dependent init is broadcast
within each data group, dead-latent statistics count firings over the data group, BatchTopK
selects over the global batch and the AuxK loss is normalised by it (`TopKSAE.global_batch`), and
the gradient norm (for clipping), L0 and the dead fraction add up the shards, so every rank keeps
the weights and statistics a single process would.

Precision (`precision`, chosen in `SAETrainer.arithmetic` only): the weights, gradients, Adam's
state, the loss and the metrics are fp32 in every mode. "bf16" runs the forward under
torch.autocast(bfloat16): the encoder GEMM, the top-k selection (on the bf16 pre-activations) and
the decode's products in bf16 with fp32 accumulation, their results back in fp32
(`vlsae_ray.sae.kernels`); the backward runs outside autocast, the sparse kernels' in fp32. "tf32"
lets CUDA's fp32 matmuls use TF32 during the step; "fp32" keeps them exact.
"""

from __future__ import annotations

import contextlib
import math
from typing import get_args

import torch
import torch.distributed as dist
from torch import nn

from vlsae_ray.config import Precision
from vlsae_ray.eval import metrics as eval_metrics
from vlsae_ray.sae import SparseAutoencoder, SparseLatents
from vlsae_ray.sae.init import init_dictionary_from_data
from vlsae_ray.sae.topk import TopKSAE
from vlsae_ray.train.parallel import ParallelLayout

# Gao et al. 2024 (sec. A.2): a latent is dead once it has not fired for 10M tokens.
MAX_DEAD_TOKENS = 10_000_000


# Runs of at least this many steps keep Gao et al.'s rate; shorter ones take a larger one.
LONG_RUN_STEPS = 2**15


def default_lr(n_latents: int, total_steps: int = LONG_RUN_STEPS) -> float:
    """2e-4 / sqrt(F / 2^14) * sqrt(max(1, 2^15 / total_steps)).

    The first factor is the scaling with width of Gao et al. 2024 (sec. 2.3), a rate for long runs.
    A run of T < 2^15 steps multiplies it by sqrt(2^15 / T), the fixed-horizon step size ∝ 1/sqrt(T):
    Adam moves each weight by about lr per step at most, so at Gao's rate the decoder columns of a
    short run cannot turn from their initial directions to features (benchmarks/README.md).
    """
    return 2e-4 / math.sqrt(n_latents / 2**14) * math.sqrt(max(1.0, LONG_RUN_STEPS / total_steps))


class SAETrainer:
    """Adam, the learning-rate schedule and dead-latent statistics for one SAE.

    Schedule: linear warm-up from lr / warmup_steps to lr over `warmup_steps` (default
    min(1000, total_steps // 20)), constant, then linear decay to 0 over the final
    `decay_fraction` of `total_steps` (Anthropic, "Circuits Updates - April 2024").
    Dead latents: those that have not fired for `dead_tokens_threshold` samples, by default
    min(10M, a tenth of the run's samples) so short runs also find their dead latents.
    `sample` ([N, d] raw activations) triggers the data-dependent init (input scale, b_dec);
    `sample_modality` ([N] bool, True = text) goes with it for a VL-SAE.
    `precision`: "fp32", "tf32" or "bf16" (module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int,
        lr: float | None = None,
        warmup_steps: int | None = None,
        decay_fraction: float = 0.2,
        sample: torch.Tensor | None = None,
        sample_modality: torch.Tensor | None = None,
        grad_clip: float | None = 1.0,
        dead_tokens_threshold: int | None = None,
        layout: ParallelLayout | None = None,
        zero_stage: int | None = None,
        precision: Precision = "fp32",
    ):
        if precision not in get_args(Precision):
            raise ValueError(f"precision={precision!r} is not one of {', '.join(get_args(Precision))}")
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be at least 1")
        if not 0 <= decay_fraction <= 1:
            raise ValueError(f"decay_fraction={decay_fraction} must be between 0 and 1")
        self.model = model
        self.sae: SparseAutoencoder = getattr(model, "module", model)
        # Without a layout: plain data parallelism over the world when torch.distributed is up.
        self.layout = layout or ParallelLayout.create(latent_shards=1)
        if isinstance(self.sae, TopKSAE):  # its selection and AuxK loss span the data-parallel ranks
            self.sae.global_batch = self.layout
        if sample is not None:
            init_args = (sample,) if sample_modality is None else (sample, sample_modality)
            self.sae.init_from_data(*init_args)
            init_dictionary_from_data(self.sae, sample)
        if self.layout.data_parallel > 1:  # one initial state per data group, whatever each rank drew
            for tensor in self.sae.state_dict().values():
                dist.broadcast(tensor, src=self.layout.data_source, group=self.layout.data_group)
        self.total_steps = total_steps
        self.lr = default_lr(self.sae.config.n_latents, total_steps) if lr is None else lr
        self.warmup_steps = min(1000, total_steps // 20) if warmup_steps is None else warmup_steps
        self.decay_steps = int(decay_fraction * total_steps)
        self.grad_clip = grad_clip
        self.dead_tokens_threshold = dead_tokens_threshold
        self.precision = precision
        device = self.sae.b_dec_d.device
        # The fused kernel updates every parameter in one pass (Adam is a large share of a sparse step).
        self.optimizer = torch.optim.Adam(
            self.sae.parameters(), lr=self.lr, fused=device.type in ("cpu", "cuda")
        )
        self.zero_stage = zero_stage
        if zero_stage is None:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        else:
            self._init_deepspeed(zero_stage)
        # per latent of this rank: all of them, or its shard's
        n_latents = getattr(self.sae, "n_local", self.sae.config.n_latents)
        self.tokens_since_fired_f = torch.zeros(n_latents, dtype=torch.long, device=self.sae.b_dec_d.device)
        self.steps = 0

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` at step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay_steps and step >= self.total_steps - self.decay_steps:
            return max(0.0, (self.total_steps - step) / self.decay_steps)
        return 1.0

    def dead_mask(self) -> torch.Tensor:
        if self.dead_tokens_threshold is None:
            return torch.zeros_like(self.tokens_since_fired_f, dtype=torch.bool)
        return self.tokens_since_fired_f >= self.dead_tokens_threshold

    def step(self, x_bd: torch.Tensor, modality_b: torch.Tensor | None = None) -> dict[str, float]:
        """One optimisation step on a batch of raw activations (`modality_b`: text rows, for a VL-SAE).

        Returns `loss` (the sum of the loss terms), `fvu` (sum ||x - x_hat||^2 / sum ||x - mean x||^2
        on this batch; with `modality_b` also `fvu_vision` and `fvu_text`, each side's own), `l0`
        (mean active latents per sample), `dead_fraction` (after this step's firings), `lr` (the
        rate this step used) and one entry per loss term (`mse`, `auxk`, `l1`; a VL-SAE's
        `mse_vision`, `mse_text`).
        """
        x_bd = x_bd.to(self.sae.b_dec_d.device, torch.float32)
        self.model.train()
        extra = {} if modality_b is None else {"modality_b": modality_b.to(x_bd.device)}
        with self.arithmetic() as autocast:  # the matmul precision holds for the whole step
            with autocast:  # the forward only
                x_hat_bd, z, aux = self.model(x_bd, self.dead_mask(), sparse_latents=True, **extra)
            loss = sum(aux.values())
            lr = self.optimizer.param_groups[0]["lr"]
            if self.zero_stage is None:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.sae.remove_parallel_grads_()
                if self.grad_clip is not None:
                    self._clip_grad_norm()
                self.optimizer.step()
                self.scheduler.step()
                self.sae.normalize_decoder_()
            else:  # the engine averages, clips, steps Adam and the schedule, and zeroes the gradients
                self.model.backward(loss)
                self.model.step()
                self.sae.normalize_decoder_()
                self.optimizer.refresh_fp32_params()  # ZeRO's fp32 master copy takes the normalised columns
        self.steps += 1
        with torch.no_grad():
            self._count_firings(z)
            fvu = (x_bd - x_hat_bd).pow(2).sum() / (x_bd - x_bd.mean(0)).pow(2).sum().clamp_min(1e-12)
            # [active entries, dead latents] of this shard, summed over the latent group
            counts = self.layout.sum_over_shards_(
                torch.stack([(z.values_n != 0).sum(), self.dead_mask().sum()]).double()
            )
            metrics = {
                "loss": float(loss.detach()),
                "fvu": float(fvu),
                "l0": float(counts[0]) / z.batch_size,
                "dead_fraction": float(counts[1]) / self.sae.config.n_latents,
                "lr": lr,
            }
            if modality_b is not None:  # a VL-SAE: each side's FVU over its own rows
                text_b = modality_b.to(x_bd.device)
                for name, rows_b in (("fvu_vision", ~text_b), ("fvu_text", text_b)):
                    if bool(rows_b.any()):
                        metrics[name] = eval_metrics.fvu(x_bd[rows_b], x_hat_bd[rows_b])
        metrics.update({name: float(term.detach()) for name, term in aux.items()})
        return metrics

    @contextlib.contextmanager
    def arithmetic(self):
        """The one place that sets a step's precision: open around the step, yields the forward's context.

        The fp32 matmul precision (TF32 or exact) holds for the whole step and is put back afterwards, so
        nothing outside the step changes; the yielded context, torch.autocast (on for "bf16"), wraps the
        forward only (autocast's rule: the backward runs outside it, in the forward's dtypes).
        """
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if self.precision == "tf32" else "highest")
        try:
            device_type = self.sae.b_dec_d.device.type
            yield torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        finally:
            torch.set_float32_matmul_precision(previous)

    def _init_deepspeed(self, zero_stage: int) -> None:
        """Wrap the SAE in a DeepSpeed engine: ZeRO `zero_stage` over the data-parallel ranks.

        Stage 1 partitions Adam's state, stage 2 also the gradients, each over the data-parallel
        group (Rajbhandari et al. 2020). The decoder gradient loses its component along each column
        in a gradient hook, before ZeRO reduces and partitions it; clipping is DeepSpeed's own (the
        same global norm). Adam stays torch's (`zero_allow_untested_optimizer`), so nothing is compiled
        for it on CPU. The engine runs in fp32 (no `bf16` section) whatever `precision` says: bf16 is
        autocast around the forward, as without DeepSpeed, so the weights it partitions and the
        gradients it reduces are the fp32 ones and every layout computes the same step.
        """
        import deepspeed

        if self.layout.latent_shards != 1:
            raise ValueError("DeepSpeed ZeRO runs on data-parallel workers only; use latent_shards: 1")
        if self.model is not self.sae:
            raise ValueError("pass the bare SAE with DeepSpeed: the engine replaces DistributedDataParallel")
        self.sae.W_dec_fd.register_hook(self.sae.without_parallel_grad)
        # On CPU DeepSpeed's communication backend would JIT-compile its shared-memory all-reduce (a
        # C++ build of 20-50 s in each new environment), which only its inference path uses: off.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        config = {
            "train_micro_batch_size_per_gpu": 1,  # batches are cut by our stream; DeepSpeed only checks these
            "gradient_accumulation_steps": 1,
            "train_batch_size": self.layout.data_parallel,
            "zero_optimization": {"stage": zero_stage},
            "gradient_clipping": self.grad_clip or 0.0,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
        }
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.sae,
            optimizer=self.optimizer,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor),
            config=config,
            dist_init_required=False,
        )

    @torch.no_grad()
    def _clip_grad_norm(self) -> None:
        """Scale gradients to a global norm of at most `grad_clip`, as `clip_grad_norm_` on the full SAE.

        Sharded parameters' squared norms add up over the latent group; replicated ones count once.
        """
        sharded = {id(p) for p in getattr(self.sae, "sharded_parameters", list)()}
        params = [p for p in self.sae.parameters() if p.grad is not None]
        sharded_sq = replicated_sq = torch.zeros((), dtype=torch.float64, device=self.sae.b_dec_d.device)
        for p in params:  # vector_norm allocates no copy of the gradient
            if id(p) in sharded:
                sharded_sq = sharded_sq + torch.linalg.vector_norm(p.grad).double() ** 2
            else:
                replicated_sq = replicated_sq + torch.linalg.vector_norm(p.grad).double() ** 2
        total = float((self.layout.sum_over_shards_(sharded_sq) + replicated_sq).sqrt())
        coef = self.grad_clip / (total + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([p.grad for p in params], coef)

    def _count_firings(self, z: SparseLatents) -> None:
        fired_f = torch.zeros_like(self.tokens_since_fired_f)
        fired_f[z.indices_n[z.values_n != 0]] = 1
        n_samples = torch.tensor(z.batch_size, device=fired_f.device)
        self.layout.reduce_over_data_(fired_f, op=dist.ReduceOp.MAX)
        self.layout.reduce_over_data_(n_samples)
        if self.dead_tokens_threshold is None:
            # A tenth of the run (at this batch size), capped at Gao et al.'s 10M samples.
            self.dead_tokens_threshold = min(MAX_DEAD_TOKENS, max(1, self.total_steps * int(n_samples) // 10))
        self.tokens_since_fired_f += n_samples
        self.tokens_since_fired_f[fired_f.bool()] = 0

    def state_dict(self) -> dict:
        """Everything besides the SAE weights needed to resume: optimiser, schedule, statistics.

        Under ZeRO the optimiser's state is this rank's partition: its slice of Adam's moments and
        of the fp32 master weights, with DeepSpeed's bookkeeping (`state_globals` lists its classes).
        """
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tokens_since_fired_f": self.tokens_since_fired_f.clone(),
            "dead_tokens_threshold": self.dead_tokens_threshold,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.zero_stage is None:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            # DeepSpeed takes every data-parallel rank's state, indexed by rank; with the layout it
            # was saved with, each rank reads only its own entry, master weights included.
            partitions = [state["optimizer"]] * self.layout.data_parallel
            self.optimizer.load_state_dict(partitions, load_from_fp32_weights=True)
        self.scheduler.load_state_dict(state["scheduler"])
        self.tokens_since_fired_f.copy_(state["tokens_since_fired_f"])
        self.dead_tokens_threshold = state["dead_tokens_threshold"]
        self.steps = state["steps"]

    def state_globals(self) -> list[type]:
        """The classes besides tensors and builtins in `state_dict()`, for `torch.load(weights_only=True)`."""
        if self.zero_stage is None:
            return []
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        return [LossScaler, ZeroStageEnum, fragment_address]
