"""Distributed SAE training with Ray Train: one `train_loop_per_worker`, data x latent parallel.

Workers form data_parallel x latent_shards (`parallel.ParallelLayout`): the ranks of a latent
group split one SAE's latents (`parallel.LatentShardedSAE`); data groups train on different
parts of each global batch and average gradients with DistributedDataParallel (gloo on CPU,
NCCL on GPU), or with DeepSpeed ZeRO 1/2 (`training.zero_stage`, without latent shards). Each
data part reads its batches from the shard store through a Ray Data dataset of its own
(`ActivationStream`: seeded, so a resumed run sees exactly the batches it had left). Every
`checkpoint_every` steps all ranks write a checkpoint beside the output (`checkpoint`; under
ZeRO each rank its own optimiser partition); a restarted worker (Ray Train's FailureConfig) or a
resubmitted job resumes from the latest one. Rank 0 logs progress, reports metrics to Ray Train
and saves the trained SAE, gathered from its shards, to the output.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from pydantic import BaseModel

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import ActivationStream, StreamPosition
from vlsae_ray.config import TrainConfig
from vlsae_ray.local_stack import connect_ray
from vlsae_ray.provenance import read_run_info, write_run_info
from vlsae_ray.sae import build_sae
from vlsae_ray.train import checkpoint
from vlsae_ray.train.parallel import LatentShardedSAE, ParallelLayout
from vlsae_ray.train.step import SAETrainer

INIT_SAMPLES = 8192
REPORT_EVERY = 10
log = logging.getLogger(__name__)


class TrainSummary(BaseModel):
    output: str
    steps: int
    samples: int
    samples_per_second: float
    metrics: dict[str, float]


def _init_sample(dataset: str, rows: int, seed: int) -> torch.Tensor:
    """Up to `rows` activations from seeded random shards, for the data-dependent init."""
    manifest = store.read_manifest(dataset)
    order = torch.randperm(len(manifest.shards), generator=torch.Generator().manual_seed(seed)).tolist()
    parts, total = [], 0
    for i in order:
        activations, _, _ = store.read_shard(dataset, manifest.shards[i])
        parts.append(activations.float())
        total += activations.shape[0]
        if total >= rows:
            break
    return torch.cat(parts)[:rows]


def _build(sae_config, layout: ParallelLayout, training, device, init_sample, total_steps) -> SAETrainer:
    """One SAE of the job (this rank's shard of it), wrapped for data parallelism, and its trainer."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(training.seed)
    if layout.latent_shards > 1:
        sae = LatentShardedSAE(sae_config, layout, seed=training.seed).to(device)
    else:
        sae = build_sae(sae_config).to(device)
    model = sae
    if layout.data_parallel > 1 and training.zero_stage is None:
        model = DistributedDataParallel(
            sae,
            process_group=layout.data_group,
            device_ids=[device] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no second copy
        )
    return SAETrainer(
        model,
        total_steps=total_steps,
        lr=training.lr,
        sample=init_sample,
        layout=layout,
        zero_stage=training.zero_stage,
        precision=training.precision,
    )


class _EventLog:
    """Rank 0's TensorBoard event files: written locally, copied to OUTPUT/tensorboard/ at each sync.

    One scalar per metric and step (`sweep-00/fvu`, ... for a sweep); `tensorboard --logdir` on
    the copied folder shows the curves.
    """

    def __init__(self, output: str):
        import tempfile

        from torch.utils.tensorboard import SummaryWriter

        self.output = storage.join(output, "tensorboard")
        self.folder = tempfile.mkdtemp(prefix="vlsae-tensorboard-")
        self.writer = SummaryWriter(self.folder)

    def add(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def sync(self) -> None:
        self.writer.flush()
        for path in Path(self.folder).iterdir():
            storage.write_bytes(storage.join(self.output, path.name), path.read_bytes())


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    training = config.training
    layout = ParallelLayout.create(training.latent_shards)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))  # DeepSpeed reads it
    stream = ActivationStream(
        config.activations,
        batch_size=training.batch_size,
        seed=training.seed,
        window_shards=training.window_shards,
        part=layout.data_index,
        parts=layout.data_parallel,
        read_tasks=training.read_tasks,
    )
    total_steps = sum(stream.steps_in_epoch(epoch) for epoch in range(training.epochs))
    device = ray.train.torch.get_device()
    runs = [
        (output, _build(sae_config, layout, training, device, loop_config["init_sample"], total_steps))
        for output, sae_config in config.sae_runs()
    ]
    positions = {checkpoint.restore(output, trainer, layout) for output, trainer in runs}
    if len(positions) > 1:
        raise RuntimeError(f"the sweep's checkpoints under {config.output!r} are at different steps")
    position = positions.pop()
    steps = runs[0][1].steps
    if position != StreamPosition() and rank == 0:
        log.warning("resuming from the checkpoint at step %d (epoch %d)", steps, position.epoch)
    events = _EventLog(config.output) if rank == 0 else None
    start, first_step, metrics = time.perf_counter(), steps, [{} for _ in runs]
    for epoch in range(position.epoch, training.epochs):
        step_in_epoch = position.step if epoch == position.epoch else 0
        for x_bd in stream.epoch(epoch, start_step=step_in_epoch):  # one read of the data for every SAE
            metrics = [trainer.step(x_bd) for _, trainer in runs]
            steps, step_in_epoch = steps + 1, step_in_epoch + 1
            if training.checkpoint_every and steps % training.checkpoint_every == 0:
                reached = StreamPosition(epoch, step_in_epoch)
                for output, trainer in runs:
                    checkpoint.save(output, trainer, reached, layout, training.keep_checkpoints)
                if events:
                    events.sync()
            if steps % REPORT_EVERY == 0 or steps == total_steps:
                rate = (steps - first_step) * training.batch_size / (time.perf_counter() - start)
                samples = steps * training.batch_size
                for run_metrics in metrics:
                    run_metrics.update(steps=steps, samples=samples, samples_per_second=rate)
                named = _named(config, metrics)
                ray.train.report(named)
                if events:
                    events.add(named, steps)
                    eta = (total_steps - steps) * training.batch_size / max(rate, 1e-9)
                    log.warning(
                        "step %d/%d (%.0f%%)  %.0f samples/s  ETA %.0f s  %s",
                        steps, total_steps, 100 * steps / total_steps, rate, eta,
                        "  ".join(f"[fvu {m['fvu']:.3f} l0 {m['l0']:.1f}]" for m in metrics),
                    )
    if events:
        events.sync()
    for (output, trainer), run_metrics in zip(runs, metrics, strict=True):
        sae = trainer.sae
        full = sae.full_sae() if layout.latent_shards > 1 else sae
        if rank == 0:
            full.save(output)
            write_run_info(output, "train", config, **run_metrics)


def _named(config: TrainConfig, metrics: list[dict[str, float]]) -> dict[str, float]:
    """One SAE's metrics as they are; a sweep's prefixed by each SAE's folder (sweep-00/fvu, ...)."""
    if not config.sweep:
        return metrics[0]
    return {
        f"{output.rstrip('/').rsplit('/', 1)[-1]}/{key}": value
        for (output, _), run_metrics in zip(config.sae_runs(), metrics, strict=True)
        for key, value in run_metrics.items()
    }


def run_train(config: TrainConfig) -> TrainSummary:
    """Fit the configured SAE on the activation dataset with a Ray Train TorchTrainer."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    manifest = store.read_manifest(config.activations)
    if manifest.d != config.sae.d_in:
        raise ValueError(
            f"sae.d_in is {config.sae.d_in} but the activations at {config.activations!r} have "
            f"d={manifest.d}; set sae.d_in: {manifest.d}"
        )
    workers = config.training.num_workers
    ActivationStream(  # fails now if the dataset cannot fill one batch per data-parallel part
        config.activations,
        batch_size=config.training.batch_size,
        seed=config.training.seed,
        window_shards=config.training.window_shards,
        parts=workers // config.training.latent_shards,
    )
    storage.check_writable(config.output)
    connect_ray()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "init_sample": _init_sample(config.activations, INIT_SAMPLES, config.training.seed),
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=config.training.use_gpu,
            resources_per_worker={
                "CPU": config.training.cpus_per_worker,
                **({"GPU": 1} if config.training.use_gpu else {}),
            },
        ),
        torch_config=TorchConfig(backend="nccl" if config.training.use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"vlsae-train-{int(time.time())}",
            failure_config=FailureConfig(max_failures=config.training.max_failures),
        ),
    )
    trainer.fit()
    results = [read_run_info(output)["results"] for output, _ in config.sae_runs()]
    progress = ("steps", "samples", "samples_per_second")  # the same for every SAE of the job
    return TrainSummary(
        output=config.output,
        steps=int(results[0].get("steps", 0)),
        samples=int(results[0].get("samples", 0)),
        samples_per_second=float(results[0].get("samples_per_second", 0.0)),
        metrics=_named(config, [{k: v for k, v in r.items() if k not in progress} for r in results]),
    )
