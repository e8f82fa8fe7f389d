"""The evaluate job's passes over a stored activation dataset, as Ray Data map-reduces.

The activation dataset and the embedding dataset hold the same items row for row (extract both
hook points in one job). Ray tasks read groups of shards through `storage` and reduce them to a
small partial state; the driver adds the partials as they stream in:

- pass 1 (`first_pass`): per-neuron and per-latent min and max (the MS normalisation), the FVU /
  L0 / dead-latent statistics of every checkpoint, and each latent's exact top-k rows;
- pass 2 (`ms_pass`): the MS sums (Σ ã_n e_n [F, D], Σ ã_n, Σ ã_n²) normalised with pass 1's global
  min and max, then the score (see `monosemanticity`).

A partial is a few [F] and [F, D] tensors whatever the number of rows, so memory per task is one
shard plus the partial, and the reduce costs O(tasks · F · D). Each task runs its SAE forwards
on the device Ray assigned it (`gpus_per_task` GPUs, decided by `vlsae_ray.devices.gpu_request`)
and keeps the latents sparse: statistics, MS sums and top rows never build a dense [rows, F].

The embedding model is whatever extracted the embedding dataset: any dataset of image embeddings
over the same items works, e.g. hook point `visual` of a CLIP (the image embedding, as Pach et al.
use) or another model's image features, extracted beside the activations.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np
import torch

from vlsae_ray import progress
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import shard_offsets
from vlsae_ray.devices import assigned_device
from vlsae_ray.eval.metrics import ReconstructionStats
from vlsae_ray.eval.monosemanticity import MonosemanticityAccumulator
from vlsae_ray.eval.top_rows import TopRows
from vlsae_ray.sae import MatryoshkaConfig, SparseAutoencoder
from vlsae_ray.sae.base import load_sae
from vlsae_ray.sae.kernels import SparseLatents, decode


@dataclass(frozen=True)
class PassPlan:
    """What the passes read and compute."""

    activations: str
    embeddings: str | None = None  # None: no MS
    sae: str | None = None  # the SAE whose latents get the MS and top rows; None: raw neurons only
    checkpoints: tuple[str, ...] = ()  # FVU / L0 / dead of each (`sae` is measured too)
    top_k: int = 9
    keep_vectors: bool = False  # keep the activation vectors of the top rows (VL-SAE similarity)
    batch_size: int = 1024
    shards_per_task: int = 4
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0

    @property
    def task_resources(self) -> dict[str, float]:
        """Each task's Ray resources: a GPU share, or CPUs (Ray Data gives a GPU task one CPU)."""
        return {"num_gpus": self.gpus_per_task} if self.gpus_per_task else {"num_cpus": self.cpus_per_task}

    @property
    def measured(self) -> tuple[str, ...]:
        """Every checkpoint measured in pass 1: `sae` first, then the others."""
        return tuple(dict.fromkeys([*([self.sae] if self.sae else []), *self.checkpoints]))


@dataclass
class FirstPass:
    """Pass 1's state, a task's partial or the reduced whole."""

    rows: int = 0
    embedding_dim: int = 0
    # min and max only in this pass: accumulators with no embedding dimensions, so partials stay small
    neurons: MonosemanticityAccumulator | None = None
    latents: MonosemanticityAccumulator | None = None
    stats: dict[str, ReconstructionStats] = field(default_factory=dict)
    top: TopRows | None = None

    def merge(self, other: FirstPass) -> FirstPass:
        self.rows += other.rows
        self.embedding_dim = max(self.embedding_dim, other.embedding_dim)
        for mine, theirs in ((self.neurons, other.neurons), (self.latents, other.latents)):
            if mine is not None:
                mine.merge(theirs)
        if self.top is not None:
            self.top.merge_rows(other.top)
        for uri, stats in other.stats.items():
            self.stats[uri].merge(stats)
        return self


def _read_pair(plan: PassPlan, record: dict) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    x, ids, _ = store.read_shard(
        plan.activations, store.ShardRecord.model_validate_json(record["activations"])
    )
    if not plan.embeddings:
        return x.float(), None, ids
    embedding_record = store.ShardRecord.model_validate_json(record["embeddings"])
    e, embedding_ids, _ = store.read_shard(plan.embeddings, embedding_record)
    if embedding_ids != ids:
        raise ValueError(
            f"shard {embedding_record.index} of the embeddings {plan.embeddings!r} holds other items "
            f"than the activations {plan.activations!r}; extract both hook points in one job"
        )
    return x.float(), e.float(), ids


def _prefix_reconstructions(sae: SparseAutoencoder, z: SparseLatents) -> list[torch.Tensor]:
    """Each nested Matryoshka prefix's own reconstruction (latents beyond its end left out)."""
    return [
        decode(z.select(z.indices_n < end), sae.W_dec_fd, sparse=True) + sae.input_scale * sae.b_dec_d
        for end in sae.config.group_ends
    ]


@torch.no_grad()
def _first_partial(batch: dict[str, np.ndarray], plan: PassPlan) -> dict[str, np.ndarray]:
    part = FirstPass()
    device = assigned_device()
    main = load_sae(plan.sae) if plan.sae else None
    saes = {uri: load_sae(uri).to(device) for uri in plan.measured}  # once per task, not per batch
    for record in _records(batch):
        x_nd, e_nd, ids = _read_pair(plan, record)
        if part.neurons is None and e_nd is not None:
            part.embedding_dim = e_nd.shape[1]
            part.neurons = MonosemanticityAccumulator(x_nd.shape[1], 0)
            if main is not None:
                part.latents = MonosemanticityAccumulator(main.config.n_latents, 0)
        if part.top is None and main is not None:
            part.top = TopRows(plan.top_k, main.config.n_latents, plan.keep_vectors)
        for start in range(0, x_nd.shape[0], plan.batch_size):
            x_bd, row = x_nd[start : start + plan.batch_size], record["offset"] + start
            if part.neurons is not None:
                part.neurons.observe(x_bd)
            for uri, sae in saes.items():
                x_hat_bd, z, _ = sae(x_bd.to(device), sparse_latents=True)
                groups = len(sae.config.group_ends) if isinstance(sae.config, MatryoshkaConfig) else 0
                prefixes = [x_hat.cpu() for x_hat in _prefix_reconstructions(sae, z)] if groups else []
                x_hat_bd, z = x_hat_bd.cpu(), z.to("cpu")
                stats = part.stats.setdefault(
                    uri, ReconstructionStats(x_nd.shape[1], sae.config.n_latents, groups)
                )
                stats.update(x_bd, x_hat_bd, z)
                if groups:
                    stats.update_prefixes(x_bd, prefixes)
                if uri == plan.sae:
                    if part.latents is not None:
                        part.latents.observe(z)
                    part.top.update(z, row, ids[start : start + plan.batch_size], x_bd)
        part.rows += x_nd.shape[0]
    return {"partial": np.array([pickle.dumps(part)], dtype=object)}


@torch.no_grad()
def _ms_partial(batch: dict[str, np.ndarray], plan: PassPlan, bounds: FirstPass) -> dict[str, np.ndarray]:
    embedding_dim = bounds.embedding_dim
    neurons = MonosemanticityAccumulator.from_bounds(
        bounds.neurons.min_f, bounds.neurons.max_f, embedding_dim
    )
    latents = (
        MonosemanticityAccumulator.from_bounds(bounds.latents.min_f, bounds.latents.max_f, embedding_dim)
        if bounds.latents is not None
        else None
    )
    device = assigned_device()
    sae = load_sae(plan.sae).to(device) if latents is not None else None
    for record in _records(batch):
        x_nd, e_nd, _ = _read_pair(plan, record)
        for start in range(0, x_nd.shape[0], plan.batch_size):
            x_bd, e_bd = x_nd[start : start + plan.batch_size], e_nd[start : start + plan.batch_size]
            neurons.accumulate(x_bd, e_bd)
            if latents is not None:
                latents.accumulate(sae.encode_sparse(x_bd.to(device)).to("cpu"), e_bd)
    return {"partial": np.array([pickle.dumps((neurons, latents))], dtype=object)}


def _records(batch: dict[str, np.ndarray]) -> list[dict]:
    return [
        {"activations": str(a), "embeddings": str(e), "offset": int(o)}
        for a, e, o in zip(batch["activations"], batch["embeddings"], batch["offset"], strict=True)
    ]


def _shard_dataset(plan: PassPlan):
    """A Ray dataset of paired shard records (with each shard's first global row), grouped into tasks."""
    import ray

    from vlsae_ray.local_stack import connect_ray

    connect_ray()
    activations = store.read_manifest(plan.activations)
    if not activations.shards:
        raise ValueError(f"activation dataset {plan.activations!r} has no committed shards")
    embeddings = store.read_manifest(plan.embeddings).shards if plan.embeddings else None
    if embeddings is not None and [s.rows for s in embeddings] != [s.rows for s in activations.shards]:
        raise ValueError(
            f"embeddings {plan.embeddings!r} and activations {plan.activations!r} have different shards; "
            "extract both from the same job (one run with both hook points)"
        )
    offsets = shard_offsets(activations)
    records = [
        {
            "activations": shard.model_dump_json(),
            "embeddings": embeddings[i].model_dump_json() if embeddings else "",
            "offset": offsets[i],
        }
        for i, shard in enumerate(activations.shards)
    ]
    tasks = -(-len(records) // plan.shards_per_task)
    return ray.data.from_items(records, override_num_blocks=tasks)


def _reduce(ds) -> list:
    partials = []
    for row in ds.iter_rows():
        partials.append(pickle.loads(row["partial"]))
        progress.advance()
    return partials


def first_pass(plan: PassPlan) -> FirstPass:
    ds = _shard_dataset(plan).map_batches(
        _first_partial,
        fn_kwargs={"plan": plan},
        batch_size=plan.shards_per_task,
        **plan.task_resources,
    )
    total = None
    for part in _reduce(ds):
        total = part if total is None else total.merge(part)
    return total


def ms_pass(plan: PassPlan, bounds: FirstPass) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(MS of the raw neurons [d], MS of the SAE latents [F] or None), normalised with pass 1's bounds."""
    if bounds.neurons is None:
        raise ValueError("the Monosemanticity Score needs an embedding dataset (`embeddings` in the config)")
    ds = _shard_dataset(plan).map_batches(
        _ms_partial,
        fn_kwargs={"plan": plan, "bounds": bounds},
        batch_size=plan.shards_per_task,
        **plan.task_resources,
    )
    neurons = latents = None
    for part_neurons, part_latents in _reduce(ds):
        if neurons is None:
            neurons, latents = part_neurons, part_latents
            continue
        neurons.merge(part_neurons)
        if latents is not None:
            latents.merge(part_latents)
    return neurons.score(), (latents.score() if latents is not None else None)


def monosemanticity_map_reduce(
    activations: str, embeddings: str, sae: str | None = None, **options
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The MS of a stored dataset's neurons (and of an SAE's latents on it) by the two-pass map-reduce.

    Equal, up to float rounding, to `monosemanticity_score` on the whole dataset in memory.
    """
    plan = PassPlan(activations, embeddings, sae, top_k=1, **options)
    return ms_pass(plan, first_pass(plan))
