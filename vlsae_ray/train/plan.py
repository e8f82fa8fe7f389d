"""`vlsae plan`: memory per worker, sharding layout and step cost of latent-sharded TopK SAE training.

Pure arithmetic, no torch: it answers "which layout, and does it fit?" before a job asks for GPUs.

Setup. `n_gpus` workers form `data_parallel` (P) groups of `latent_shards` (W) workers, P·W = n_gpus.
Each worker of a latent-shard group holds F_w = F/W encoder rows and decoder columns and sees the
same B_w = B/P samples as the rest of its group; the groups split the global batch B.

Precision is the trainer's `training.precision` (`vlsae_ray.train.step`): weights, gradients and
Adam's state are fp32 in every mode, and c, the bytes of the forward's compute dtype, is 4 for fp32
and tf32 and 2 for bf16 (autocast: the encoder GEMM, its pre-activations, the top-k candidates and
the decode's products; their results continue in fp32, 4 bytes). With 8 bytes per int64 index,
one worker holds (Shapes as in `vlsae_ray.sae.base`; n = 2·F_w·d + F_w + d parameters: W_enc
[F_w, d], W_dec [F_w, d], b_enc [F_w], b_dec [d], b_dec replicated across the shards):

    parameters   n·4
    gradients    n·4, or ceil(n/P)·4 with ZeRO 2 (each data-parallel rank keeps its partition);
                 under plain DDP the gradients are views of its all-reduce buckets
                 (`gradient_as_bucket_view=True`), so no second copy
    optimizer    Adam's two fp32 moments, 8 bytes per element, plus, with ZeRO, a fp32 master copy,
                 4 bytes (DeepSpeed's ZeRO optimizer always steps a fp32 partition,
                 deepspeed/runtime/zero/stage_1_and_2.py), over m = n elements, or m = ceil(n/P)
                 with ZeRO 1 or 2 (Rajbhandari et al. 2020, "ZeRO", sec. 5); plus one fp32 step
                 counter per optimised tensor (4 tensors, or 1 flat partition with ZeRO)

and, in one step, the forward's buffers (peak at the AuxK selection, when all are alive):

    inputs           x and x - b_dec, and in bf16 the GEMM's cast of the latter: 2·B_w·d·4 (+ B_w·d·c)
    casts            in bf16, autocast's copy of W_enc and b_enc for the GEMM, held through the
                     forward:                                   (F_w·d + F_w)·c
    pre-activations  W_enc (x - b_dec) + b_enc, [B_w, F_w]:     B_w·F_w·c
    candidates       local top-k (values + indices); with W > 1 also the group's candidates, stacked
                     [W, B_w, k] and laid out per sample [B_w, W·k], and the global top-k
                     (`LatentShardedSAE._global_topk`):         (1 + 2W + 1)·B_w·k·(c + 8)
    codes            this worker's active entries, at most B_w·k (all winners may sit in one shard):
                     index, sample and CSR order (3 × 8 bytes) and the value's 6 differentiable fp32
                     copies of the gathered pre-activation path (`SparseAutoencoder.gathered_pre_acts`),
                     and the offsets by latent that the backward's sums use, (F_w + 1)·8
    reconstruction   partial decode, x_hat, x - x_hat, its square: 4·B_w·d·4
    AuxK             (Gao et al. 2024, sec. A.2) the larger of: the dead columns of the
                     pre-activations, copied for their top-k (all F_w in the worst case), with its
                     candidates as above with aux_k for k; and, once that copy is freed, its codes,
                     its reconstruction, residual and normalised-MSE buffers, 6·B_w·d·4, and in bf16
                     the decode's transient cast of W_dec, F_w·d·c

then, once the forward's buffers are freed, the update's temporaries: projecting the decoder
gradient off each column (`remove_parallel_grads_`), two [F_w, d] buffers of the held gradient,
2·F_w·d·4 (the gradient norm for clipping allocates no copy); plus what the step keeps for its
metrics (x, x_hat and the codes), and with ZeRO a fp32 gradient-reduction bucket of
min(`zero_bucket_elements`, n) elements (DeepSpeed's default size is 5e8). The peak is

    peak = parameters + gradients + optimizer + max(forward buffers, update temporaries)

and a layout fits when peak <= `usable_fraction` × GPU memory (the rest: CUDA context, NCCL
buffers, allocator fragmentation). The AuxK term assumes every latent is dead, so the estimate is an
upper bound early in training. The model follows the sparse kernels (`vlsae_ray.sae.kernels`,
k·B <= B·F_w/8): the encoder's backward touches only the selected entries.

FLOPs per step, over all workers (a multiply-add is 2 FLOPs):

    encoder   2·B·d·F     the dense GEMM, every sample against every latent; it dominates
    decoder   2·B·k·d     the sparse decode of the B·k active entries
    AuxK      2·B·aux_k·d its decode (the selection reuses the pre-activations)
    backward  4·B·(k + aux_k)·d for the decoder (weights and codes) plus as much for the encoder,
              whose gradient is nonzero only at the selected entries: ~2× the sparse forward

Each worker does 1/n_gpus of it. Communication per step per worker, counted as the bytes each
worker sends with ring algorithms (an all-gather of c bytes per worker over G workers sends
(G-1)·c; an all-reduce of N bytes sends 2·(G-1)/G·N):

    candidates      all-gather over the shard group of the B_w·k (and B_w·aux_k) local candidates,
                    values in the compute dtype (c + 8 bytes each)
    reconstruction  all-reduce over the shard group of the fp32 [B_w, d] partial decodes (main and
                    AuxK) and, in the backward, of the centred input's gradient (Megatron-LM's f and
                    g, `vlsae_ray.train.parallel`)
    gradients       all-reduce of the n fp32 gradient elements over the P data-parallel ranks; ZeRO 1/2's
                    reduce-scatter + all-gather of updated parameters sends the same volume (ZeRO, sec. 7)

The dead-latent statistics (one flag per latent, all-reduced over P) and the scalar all-reduces
are under 1% of the gradient all-reduce and left out.

Saving the trained SAE (`vlsae_ray.sae.checkpoint`; host memory, not GPU memory, so outside `fits`):
with W > 1 each rank of the first latent group writes its shard, n·a bytes, as one file (W files,
an index and config.json), with no gather; with W = 1 rank 0 writes one file of the whole SAE.
A file larger than one part (`storage.part_size()`, 64 MiB unless VLSAE_S3_PART_SIZE says
otherwise) goes to S3 as a multipart upload of ceil(bytes / part) parts, at most 10,000; a single
PUT takes at most 5 GiB. The save streams the weights, adding at most three parts of host memory
per writing rank: a block copied off the GPU, the part being filled and the part going up (two
measured on CPU, where the block is a view: tests/train/test_sharded_save.py).

The layout chosen is the one that fits and sends the least per step (then: more data parallelism,
a lower ZeRO stage). More data parallelism is not less communication for an SAE: its parameters
(2·F·d) outweigh a batch's activations (B·d), so the all-reduce of replicated gradients costs more
than gathering candidates and partial decodes, except for small dictionaries on large batches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from vlsae_ray import storage

GiB = 2**30
S3_PUT_LIMIT = 5 * GiB  # the largest object one S3 PUT takes
INDEX_BYTES = 8  # torch.topk and the sparse codes use int64 indices
FP32_BYTES = 4  # weights, gradients, Adam's state and every result after the compute-dtype products
# `training.precision` (`vlsae_ray.config.Precision`) -> bytes of the forward's compute dtype
COMPUTE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2}
ZERO_STAGES = (0, 1, 2)
# DeepSpeed's default `reduce_bucket_size` (deepspeed/runtime/zero/config.py).
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000
# gathered_pre_acts keeps the gathered dot, its clone, b_enc at the entry, its scaled copy, the
# difference and the sum; `activate` adds the ReLU.
CODE_VALUE_COPIES = 6


class ActivationMemory(NamedTuple):
    """Bytes of one worker's forward buffers, by part."""

    inputs: int
    casts: int
    pre_activations: int
    candidates: int
    codes: int
    reconstruction: int
    auxk: int

    @property
    def total(self) -> int:
        return sum(self)


class CommVolume(NamedTuple):
    """Bytes one worker sends per step."""

    candidates: int
    reconstruction: int
    gradients: int

    @property
    def total(self) -> int:
        return sum(self)


class StepFlops(NamedTuple):
    """FLOPs of one training step over the whole global batch."""

    encoder: int
    decoder: int
    auxk: int
    backward: int

    @property
    def total(self) -> int:
        return sum(self)


class SavePlan(NamedTuple):
    """Saving the trained SAE from one layout (module docstring)."""

    files: int  # weight files: one per latent shard
    objects: int  # every object written: the weight files, config.json and a sharded save's index
    bytes_per_rank: int  # what one writing rank uploads (shard 0's, the largest)
    parts_per_file: int  # multipart parts of that file (1: one PUT)
    part_size: int
    extra_memory: int  # host memory the save adds to a writing rank
    whole_bytes: int  # the whole SAE in one file

    @property
    def single_put_too_large(self) -> bool:
        """Whether a single-file save in one PUT would exceed S3's limit."""
        return self.whole_bytes > S3_PUT_LIMIT


def save_plan(d: int, n_latents: int, latent_shards: int, part_size: int) -> SavePlan:
    """The save of an SAE of F latents split over `latent_shards` ranks (fp32 in every precision)."""
    shard_bytes = (2 * (n_latents // latent_shards) * d + n_latents // latent_shards + d) * FP32_BYTES
    return SavePlan(
        files=latent_shards,
        objects=latent_shards + (2 if latent_shards > 1 else 1),
        bytes_per_rank=shard_bytes,
        parts_per_file=max(1, math.ceil(shard_bytes / part_size)),
        part_size=part_size,
        extra_memory=3 * part_size,
        whole_bytes=(2 * n_latents * d + n_latents + d) * FP32_BYTES,
    )


class LayoutPlan(NamedTuple):
    """One candidate layout: P data-parallel groups × W latent shards, with a ZeRO stage."""

    data_parallel: int
    latent_shards: int
    zero_stage: int
    parameters: int
    gradients: int
    optimizer: int
    activations: ActivationMemory
    temporaries: int
    comm: CommVolume
    flops_per_worker: float
    save: SavePlan
    fits: bool

    @property
    def states(self) -> int:
        """Parameters, gradients and optimizer state: held between steps."""
        return self.parameters + self.gradients + self.optimizer

    @property
    def peak(self) -> int:
        return self.states + max(self.activations.total, self.temporaries)

    @property
    def name(self) -> str:
        return f"{self.data_parallel} x {self.latent_shards}"


class Plan(NamedTuple):
    """Every candidate layout of a run, the chosen one (None: nothing fits) and why."""

    d: int
    n_latents: int
    k: int
    aux_k: int
    batch_size: int
    precision: str
    n_gpus: int
    gpu_memory_gb: float
    usable_bytes: int
    part_size: int
    flops: StepFlops
    layouts: tuple[LayoutPlan, ...]
    skipped: tuple[str, ...]  # layouts that do not divide F or the batch, with the reason
    chosen: LayoutPlan | None
    reason: str

    def layout(self, data_parallel: int, latent_shards: int, zero_stage: int = 0) -> LayoutPlan:
        """The candidate with this layout and ZeRO stage."""
        for candidate in self.layouts:
            if (candidate.data_parallel, candidate.latent_shards, candidate.zero_stage) == (
                data_parallel,
                latent_shards,
                zero_stage,
            ):
                return candidate
        raise KeyError(f"no candidate layout {data_parallel} x {latent_shards} with ZeRO {zero_stage}")


def compute_bytes(precision: str) -> int:
    """Bytes of the forward's compute dtype under `training.precision` = `precision`."""
    if precision not in COMPUTE_BYTES:
        raise ValueError(
            f"precision={precision!r} is not a training precision: use one of {', '.join(COMPUTE_BYTES)}"
            " (training.precision)"
        )
    return COMPUTE_BYTES[precision]


def step_flops(d: int, n_latents: int, k: int, aux_k: int, batch_size: int) -> StepFlops:
    """FLOPs of one step over the global batch (module docstring)."""
    return StepFlops(
        encoder=2 * batch_size * d * n_latents,
        decoder=2 * batch_size * k * d,
        auxk=2 * batch_size * aux_k * d,
        backward=8 * batch_size * (k + aux_k) * d,
    )


def _selection_bytes(batch: int, k: int, shard_latents: int, latent_shards: int, c: int) -> tuple[int, int]:
    """(candidates, codes) bytes of one exact top-k across the shard group (module docstring)."""
    local_k = min(k, shard_latents)
    entry = c + INDEX_BYTES
    candidates = batch * local_k * entry
    if latent_shards > 1:
        candidates += 2 * latent_shards * batch * local_k * entry + batch * k * entry
    codes = batch * k * (3 * INDEX_BYTES + CODE_VALUE_COPIES * FP32_BYTES) + (shard_latents + 1) * INDEX_BYTES
    return candidates, codes


def _allreduce_bytes(nbytes: int, group: int) -> int:
    """Bytes each of `group` workers sends in a ring all-reduce of `nbytes`."""
    return 2 * (group - 1) * nbytes // group


def worker_plan(
    d: int,
    n_latents: int,
    k: int,
    aux_k: int,
    batch_size: int,
    c: int,
    data_parallel: int,
    latent_shards: int,
    zero_stage: int,
    zero_bucket_elements: int,
    usable_bytes: int,
    part_size: int = storage.PART_SIZE,
) -> LayoutPlan:
    """Memory, communication and FLOPs of one worker of a layout whose shards divide F and B."""
    P, W = data_parallel, latent_shards
    F_w, B_w = n_latents // W, batch_size // P
    n = 2 * F_w * d + F_w + d
    partition = math.ceil(n / P) if zero_stage >= 1 else n
    held_gradients = math.ceil(n / P) if zero_stage == 2 else n
    master = FP32_BYTES if zero_stage >= 1 else 0
    step_counters = 4 * (1 if zero_stage >= 1 else 4)
    cast = c if c < FP32_BYTES else 0  # bytes of a bf16 copy (none in fp32)

    candidates, codes = _selection_bytes(B_w, k, F_w, W, c)
    aux_candidates, aux_codes = _selection_bytes(B_w, aux_k, F_w, W, c) if aux_k else (0, 0)
    aux_decode = aux_codes + 6 * B_w * d * FP32_BYTES + F_w * d * cast
    activations = ActivationMemory(
        inputs=2 * B_w * d * FP32_BYTES + B_w * d * cast,
        casts=(F_w * d + F_w) * cast,
        pre_activations=B_w * F_w * c,
        candidates=candidates,
        codes=codes,
        reconstruction=4 * B_w * d * FP32_BYTES,
        # the dead-column copy is freed before the AuxK codes and reconstruction are made
        auxk=max(B_w * F_w * c + aux_candidates, aux_decode) if aux_k else 0,
    )
    held_decoder_gradient = F_w * d if zero_stage < 2 else math.ceil(F_w * d / P)
    bucket = min(zero_bucket_elements, n) * FP32_BYTES if zero_stage >= 1 else 0
    kept = 2 * B_w * d * FP32_BYTES + codes  # x, x_hat and the codes, which the step keeps for its metrics
    temporaries = 2 * FP32_BYTES * held_decoder_gradient + kept + bucket

    n_selections = 2 if aux_k else 1
    comm = CommVolume(
        candidates=(W - 1) * B_w * (min(k, F_w) + min(aux_k, F_w)) * (c + INDEX_BYTES),
        reconstruction=(n_selections + 1) * _allreduce_bytes(B_w * d * FP32_BYTES, W),
        gradients=_allreduce_bytes(n * FP32_BYTES, P),
    )
    layout = LayoutPlan(
        data_parallel=P,
        latent_shards=W,
        zero_stage=zero_stage,
        parameters=n * FP32_BYTES,
        gradients=held_gradients * FP32_BYTES,
        optimizer=partition * (8 + master) + step_counters,
        activations=activations,
        temporaries=temporaries,
        comm=comm,
        flops_per_worker=step_flops(d, n_latents, k, aux_k, batch_size).total / (P * W),
        save=save_plan(d, n_latents, W, part_size),
        fits=False,
    )
    return layout._replace(fits=layout.peak <= usable_bytes)


def plan(
    d: int,
    n_latents: int,
    k: int,
    batch_size: int,
    precision: str,
    n_gpus: int,
    gpu_memory_gb: float,
    *,
    zero_stage: int | None = None,
    aux_k: int | None = None,
    usable_fraction: float = 0.9,
    zero_bucket_elements: int = DEEPSPEED_BUCKET_ELEMENTS,
    part_size: int | None = None,
) -> Plan:
    """Every layout P × W = n_gpus (and ZeRO stage), its memory per worker and cost, and the choice.

    `batch_size` is the global batch (samples per optimiser step), `gpu_memory_gb` the memory of one
    GPU in GiB, of which `usable_fraction` is planned for. `zero_stage` None tries 0, 1 and 2
    (stages 1 and 2 only with data parallelism and no latent shards, as the trainer runs DeepSpeed);
    `aux_k` None is the TopK SAE's default
    (d // 2 dead latents, `TopKConfig.aux_k_latents`), 0 plans without the AuxK loss. `part_size`
    None is the S3 part size the save would use (`storage.part_size()`).
    """
    for name, value in (("d", d), ("n_latents", n_latents), ("k", k), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if not isinstance(n_gpus, int) or n_gpus < 1:
        raise ValueError(f"n_gpus={n_gpus!r} must be a positive integer")
    if not gpu_memory_gb > 0:
        raise ValueError(f"gpu_memory_gb={gpu_memory_gb!r} must be positive (GiB of one GPU, e.g. 80)")
    if k > n_latents:
        raise ValueError(f"k={k} must be at most n_latents={n_latents}")
    if aux_k is None:
        aux_k = min(n_latents, max(1, d // 2))
    if not 0 <= aux_k <= n_latents:
        raise ValueError(f"aux_k={aux_k} must be between 0 (no AuxK loss) and n_latents={n_latents}")
    if zero_stage is not None and zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage={zero_stage!r} must be one of {ZERO_STAGES} (or None to try all)")
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction={usable_fraction} must be in (0, 1]")
    c = compute_bytes(precision)
    usable_bytes = int(usable_fraction * gpu_memory_gb * GiB)
    part_size = storage.part_size() if part_size is None else part_size

    layouts, skipped = [], []
    for W in (w for w in range(1, n_gpus + 1) if n_gpus % w == 0):
        P = n_gpus // W
        if n_latents % W:
            skipped.append(f"{P} x {W}: n_latents={n_latents} is not divisible by {W} latent shards")
            continue
        if batch_size % P:
            skipped.append(f"{P} x {W}: batch_size={batch_size} is not divisible by {P} data-parallel groups")
            continue
        stages = ZERO_STAGES if zero_stage is None else (zero_stage,)
        for stage in stages:
            if stage > 0 and (P == 1 or W > 1):
                if zero_stage is not None:
                    skipped.append(f"{P} x {W} with ZeRO {stage}: ZeRO runs on data-parallel workers only")
                continue  # nothing to partition over, or latent shards (DDP then)
            layouts.append(
                worker_plan(
                    d,
                    n_latents,
                    k,
                    aux_k,
                    batch_size,
                    c,
                    P,
                    W,
                    stage,
                    zero_bucket_elements,
                    usable_bytes,
                    part_size,
                )
            )
    fitting = [layout for layout in layouts if layout.fits]
    chosen = min(fitting, key=lambda c: (c.comm.total, -c.data_parallel, c.zero_stage), default=None)
    return Plan(
        d=d,
        n_latents=n_latents,
        k=k,
        aux_k=aux_k,
        batch_size=batch_size,
        precision=precision,
        n_gpus=n_gpus,
        gpu_memory_gb=gpu_memory_gb,
        usable_bytes=usable_bytes,
        part_size=part_size,
        flops=step_flops(d, n_latents, k, aux_k, batch_size),
        layouts=tuple(layouts),
        skipped=tuple(skipped),
        chosen=chosen,
        reason=_reason(chosen, layouts, skipped, usable_bytes, gpu_memory_gb),
    )


def _reason(
    chosen: LayoutPlan | None,
    layouts: list[LayoutPlan],
    skipped: list[str],
    usable_bytes: int,
    gpu_memory_gb: float,
) -> str:
    budget = f"{usable_bytes / GiB:.1f} GiB usable of {gpu_memory_gb:g} GiB per GPU"
    if chosen is not None:
        return (
            f"{chosen.name} with ZeRO {chosen.zero_stage}: the least communication of the layouts that fit"
            f" ({chosen.peak / GiB:.1f} GiB per worker, {budget})"
        )
    if not layouts:
        return "no layout divides the latents and the batch: " + "; ".join(skipped)
    leanest = min(layouts, key=lambda c: c.peak)
    parts = {
        "parameters": leanest.parameters,
        "gradients": leanest.gradients,
        "optimizer state": leanest.optimizer,
        "forward activations": leanest.activations.total,
        "update temporaries": leanest.temporaries,
    }
    largest = max(parts, key=parts.get)
    return (
        f"no layout fits in {budget}: the leanest, {leanest.name} with ZeRO {leanest.zero_stage},"
        f" needs {leanest.peak / GiB:.1f} GiB, its largest part {largest} ({parts[largest] / GiB:.1f} GiB);"
        " use more GPUs, a smaller batch, precision bf16 or ZeRO 2"
    )


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}"


def _si(value: float, unit: str) -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def format_plan(p: Plan) -> str:
    """The plan as a table: one row per layout, memory per worker in GiB, then the choice."""
    f = p.flops
    lines = [
        f"SAE d={p.d}, F={p.n_latents:,} latents, k={p.k}, aux_k={p.aux_k}, batch {p.batch_size},"
        f" precision {p.precision};"
        f" {p.n_gpus} GPUs x {p.gpu_memory_gb:g} GiB ({p.usable_bytes / GiB:.1f} GiB planned per GPU)",
        f"FLOPs per step: {_si(f.total, 'FLOP')} (encoder {_si(f.encoder, 'FLOP')}, decoder"
        f" {_si(f.decoder, 'FLOP')}, AuxK {_si(f.auxk, 'FLOP')}, backward {_si(f.backward, 'FLOP')});"
        f" {_si(f.total / p.n_gpus, 'FLOP')} per worker",
        "",
        "memory per worker in GiB; dp x ls: data-parallel groups x latent shards; comm: bytes sent per step",
    ]
    header = ("dp x ls", "ZeRO", "params", "grads", "optim", "acts", "temps", "peak", "fits", "comm/step")
    rows = [header]
    for c in p.layouts:
        rows.append(
            (
                c.name,
                str(c.zero_stage),
                _gib(c.parameters),
                _gib(c.gradients),
                _gib(c.optimizer),
                _gib(c.activations.total),
                _gib(c.temporaries),
                _gib(c.peak),
                "yes" if c.fits else "no",
                _si(c.comm.total, "B"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines += [f"skipped {reason}" for reason in p.skipped]
    lines.append("")
    if p.chosen is None:
        lines.append(f"chosen: none. {p.reason}")
        return "\n".join(lines)
    c = p.chosen
    acts = ", ".join(f"{name.replace('_', '-')} {_gib(v)}" for name, v in c.activations._asdict().items())
    lines += [
        f"chosen: {p.reason}",
        f"  activations (GiB): {acts}",
        f"  comm per step: candidates {_si(c.comm.candidates, 'B')}, reconstruction"
        f" {_si(c.comm.reconstruction, 'B')}, gradients {_si(c.comm.gradients, 'B')}",
        *format_save(c.save),
    ]
    return "\n".join(lines)


def format_save(save: SavePlan) -> list[str]:
    """The save's lines of `format_plan`: what each rank writes, in how many parts, with what memory."""
    part = f"{save.part_size / 2**20:g} MiB"
    form = f"{save.files} shard files, an index" if save.files > 1 else "1 file"
    writers = "each rank of the first latent group" if save.files > 1 else "rank 0"
    lines = [
        f"  save: {save.objects} objects ({form} and config.json); {writers} writes"
        f" {_gib(save.bytes_per_rank)} GiB in {save.parts_per_file} part(s) of {part}, adding"
        f" {_gib(save.extra_memory)} GiB of host memory"
    ]
    if save.single_put_too_large:
        lines.append(
            f"  the whole SAE is {_gib(save.whole_bytes)} GiB: one file in one PUT would exceed S3's"
            " 5 GiB limit; files larger than one part are uploaded in parts"
        )
    if save.parts_per_file > storage.MAX_PARTS:
        least = math.ceil(save.bytes_per_rank / storage.MAX_PARTS / 2**20)
        lines.append(
            f"  a file needs {save.parts_per_file} parts, over S3's {storage.MAX_PARTS}: set"
            f" {storage.PART_SIZE_ENV} to at least {least} MiB ({least * 2**20} bytes)"
        )
    return lines
