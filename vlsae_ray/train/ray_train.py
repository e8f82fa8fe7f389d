"""Distributed SAE training with Ray Train: one `train_loop_per_worker`, data x latent parallel.

Workers form data_parallel x latent_shards (`parallel.ParallelLayout`): the ranks of a latent
group split one SAE's latents (`parallel.LatentShardedSAE`); data groups train on different
parts of each global batch and average gradients with DistributedDataParallel (gloo on CPU,
NCCL on GPU), or with DeepSpeed ZeRO 1/2 (`training.zero_stage`, without latent shards). Each
data part reads its batches from the shard store through a Ray Data dataset of its own
(`ActivationStream`: seeded, so a resumed run sees exactly the batches it had left; a VL-SAE's
batches hold image rows and text rows, and every step passes their modality). Every
`checkpoint_every` steps all ranks write a checkpoint of every SAE of the job beside the output,
committed for the whole job by one record (`checkpoint`; under ZeRO each rank its own optimiser
partition); a restarted worker (Ray Train's FailureConfig) or a resubmitted job resumes from the
latest one. `run_train` checks the config on the driver before any worker starts: datasets that
do not fit the SAE, latent sharding that cannot split it, and a resume of a checkpoint written by
another run, fail there with one message. Rank 0 logs progress and reports metrics to Ray Train;
the trained SAE is saved to the output by rank 0, or, latent-sharded, by each rank of the first
latent group as one file per shard (`LatentShardedSAE.save`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from pydantic import BaseModel

from vlsae_ray import progress, storage
from vlsae_ray.activations.reader import ActivationStream, StreamPosition, check_training_data
from vlsae_ray.config import TrainConfig
from vlsae_ray.local_stack import connect_ray
from vlsae_ray.provenance import read_run_info, write_run_info
from vlsae_ray.sae import build_sae
from vlsae_ray.train import checkpoint
from vlsae_ray.train.parallel import LatentShardedSAE, ParallelLayout, check_shardable
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


def _build(sae_config, layout: ParallelLayout, training, device, init_sample, total_steps) -> SAETrainer:
    """One SAE of the job (this rank's shard of it), wrapped for data parallelism, and its trainer.

    `init_sample`: (rows, their modality or None), from `ActivationStream.init_sample`."""
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
        sample=init_sample[0],
        sample_modality=init_sample[1],
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
        text_dataset=config.text_activations,
    )
    total_steps = sum(stream.steps_in_epoch(epoch) for epoch in range(training.epochs))
    device = ray.train.torch.get_device()
    runs = [
        (output, _build(sae_config, layout, training, device, loop_config["init_sample"], total_steps))
        for output, sae_config in config.sae_runs()
    ]
    position = checkpoint.restore(config.output, runs, loop_config["run_fields"])
    steps = runs[0][1].steps
    if position != StreamPosition() and rank == 0:
        log.warning("resuming from the checkpoint at step %d (epoch %d)", steps, position.epoch)
    events = _EventLog(config.output) if rank == 0 else None
    start, first_step, metrics = time.perf_counter(), steps, [{} for _ in runs]
    for epoch in range(position.epoch, training.epochs):
        step_in_epoch = position.step if epoch == position.epoch else 0
        for x_bd in stream.epoch(epoch, start_step=step_in_epoch):  # one read of the data for every SAE
            metrics = [trainer.step(x_bd, stream.modality_b) for _, trainer in runs]
            steps, step_in_epoch = steps + 1, step_in_epoch + 1
            if rank == 0 and loop_config.get("progress") is not None:
                loop_config["progress"].set.remote(steps)  # the CLI's progress bar
            if training.checkpoint_every and steps % training.checkpoint_every == 0:
                reached = StreamPosition(epoch, step_in_epoch)
                checkpoint.save(
                    config.output, runs, reached, loop_config["run_fields"], training.keep_checkpoints
                )
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
                        steps,
                        total_steps,
                        100 * steps / total_steps,
                        rate,
                        eta,
                        "  ".join(f"[fvu {m['fvu']:.3f} l0 {m['l0']:.1f}]" for m in metrics),
                    )
    if events:
        events.sync()
    for (output, trainer), run_metrics in zip(runs, metrics, strict=True):
        if layout.data_index == 0:  # rank 0; latent-sharded, each rank of the first group its shard
            trainer.sae.save(output)
        if rank == 0:
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
    # Ray Train workers run in their own folder: a relative local path means the driver's.
    paths = {"activations": config.activations, "output": config.output}
    paths["text_activations"] = config.text_activations
    config = config.model_copy(update={k: storage.absolute(v) for k, v in paths.items() if v is not None})
    aligner_metrics = {}
    if config.aligner is not None:  # LLaVA: the VL-SAE trains on the aligner's projections
        from vlsae_ray.train.align import run_align

        config, aligner_metrics = run_align(config)
    # The user's mistakes fail here, once, before any worker starts (not as retried worker failures).
    check_training_data(config.sae.d_in, config.activations, config.text_activations, config.paired)
    if config.text_activations is None and any(sae.architecture == "vl_sae" for _, sae in config.sae_runs()):
        log.warning(
            "a vl_sae without text_activations learns the image side only (its text decoder keeps its "
            "initial weights); set text_activations to train both sides"
        )
    if config.training.latent_shards > 1:
        for _, sae_config in config.sae_runs():
            check_shardable(sae_config, config.training.latent_shards)
    workers = config.training.num_workers
    stream = ActivationStream(  # fails now if a dataset cannot fill one batch per data-parallel part
        config.activations,
        batch_size=config.training.batch_size,
        seed=config.training.seed,
        window_shards=config.training.window_shards,
        parts=workers // config.training.latent_shards,
        text_dataset=config.text_activations,
    )
    storage.check_writable(config.output)
    run_fields = checkpoint.run_fields(config)
    checkpoint.check_resume(config.output, run_fields)  # a resume of another run would go on wrongly
    connect_ray()
    total_steps = sum(stream.steps_in_epoch(epoch) for epoch in range(config.training.epochs))
    with progress.stage("train", total_steps, "steps"), progress.remote_counter() as counter:
        _fit(config, stream, run_fields, workers, counter)
    results = [read_run_info(output)["results"] for output, _ in config.sae_runs()]
    summary = ("steps", "samples", "samples_per_second")  # the same for every SAE of the job
    return TrainSummary(
        output=config.output,
        steps=int(results[0].get("steps", 0)),
        samples=int(results[0].get("samples", 0)),
        samples_per_second=float(results[0].get("samples_per_second", 0.0)),
        metrics=_named(config, [{k: v for k, v in r.items() if k not in summary} for r in results])
        | aligner_metrics,
    )


def _fit(config: TrainConfig, stream: ActivationStream, run_fields: dict, workers: int, counter) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "init_sample": stream.init_sample(INIT_SAMPLES),
            "run_fields": run_fields,
            "progress": counter,
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
