"""Distributed SAE training with Ray Train: one `train_loop_per_worker`, data-parallel over the shards.

Each worker reads its split of the activation dataset through Ray Data, wraps the SAE with
`ray.train.torch.prepare_model` (DistributedDataParallel over gloo on CPU, NCCL on GPU) and runs
the same `SAETrainer.step` as `fit_local`. Rank 0 saves the trained SAE to the config's output.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import activation_dataset
from vlsae_ray.config import TrainConfig
from vlsae_ray.local_stack import connect_ray
from vlsae_ray.provenance import read_run_info, write_run_info
from vlsae_ray.sae import build_sae
from vlsae_ray.train.step import SAETrainer

INIT_SAMPLES = 8192
REPORT_EVERY = 10


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


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()
    batch_per_worker = config.training.batch_size // world_size
    steps_per_epoch = loop_config["rows"] // world_size // batch_per_worker
    torch.manual_seed(config.training.seed)  # identical initial weights on every rank
    model = ray.train.torch.prepare_model(build_sae(config.sae))
    trainer = SAETrainer(
        model,
        total_steps=config.training.epochs * steps_per_epoch,
        lr=config.training.lr,
        sample=loop_config["init_sample"],
    )
    shard = ray.train.get_dataset_shard("train")
    start, samples, metrics = time.perf_counter(), 0, {}
    for _ in range(config.training.epochs):
        batches = shard.iter_torch_batches(
            batch_size=batch_per_worker, drop_last=True, local_shuffle_buffer_size=4 * batch_per_worker
        )
        for step_in_epoch, batch in enumerate(batches):
            if step_in_epoch >= steps_per_epoch:  # equal step counts on every rank keep DDP in lockstep
                break
            metrics = trainer.step(batch["x"])
            samples += batch["x"].shape[0] * world_size
            if trainer.steps % REPORT_EVERY == 0 or trainer.steps == trainer.total_steps:
                metrics.update(
                    steps=trainer.steps,
                    samples=samples,
                    samples_per_second=samples / (time.perf_counter() - start),
                )
                ray.train.report(metrics)
    if rank == 0:
        trainer.sae.save(config.output)
        write_run_info(config.output, "train", config, **metrics)


def run_train(config: TrainConfig) -> TrainSummary:
    """Fit the configured SAE on the activation dataset with a Ray Train TorchTrainer."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    manifest = store.read_manifest(config.activations)
    if manifest.d != config.sae.d_in:
        raise ValueError(
            f"sae.d_in is {config.sae.d_in} but the activations at {config.activations!r} have "
            f"d={manifest.d}; set sae.d_in: {manifest.d}"
        )
    workers = config.training.num_workers
    if manifest.rows // workers < config.training.batch_size // workers:
        raise ValueError(
            f"training.batch_size={config.training.batch_size} is larger than the {manifest.rows} rows "
            f"of {config.activations!r} allow over {workers} workers; lower it"
        )
    storage.check_writable(config.output)
    connect_ray()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "rows": manifest.rows,
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
        run_config=RunConfig(name=f"vlsae-train-{int(time.time())}"),
        datasets={
            "train": activation_dataset(config.activations, shuffle_seed=config.training.seed).select_columns(
                ["x"]
            )
        },
    )
    trainer.fit()
    metrics = dict(read_run_info(config.output)["results"])
    return TrainSummary(
        output=config.output,
        steps=int(metrics.pop("steps", 0)),
        samples=int(metrics.pop("samples", 0)),
        samples_per_second=float(metrics.pop("samples_per_second", 0.0)),
        metrics=metrics,
    )
