"""Training the LLaVA aligner with Ray Train, then projecting the datasets the VL-SAE trains on.

`vlsae train -c CONFIG` with an `aligner:` section runs, in one job (`run_train`):
1. `run_align`: a TorchTrainer fits `vlsae_ray.sae.aligner.Aligner` on the paired image-mean and
   text-mean datasets (AdamW, cosine-annealed per step; data parallel with DDP, each worker's
   InfoNCE over its own share of the batch, as each GPU's would be). Each worker holds its share of
   the shards in memory, one row per item as the authors' training does (a million 4096-wide pairs
   are 32 GB, in fp32), and shuffles it every epoch: streaming would re-read the data every epoch
   for a model this small. Text row i of a batch is the caption of image row i. Rank 0 saves the
   aligner to OUTPUT/aligner with a run.json.
2. `project_dataset`: both datasets through the aligner's projections, shard by shard with the same
   shard layout and source ids, to OUTPUT/aligned/image and OUTPUT/aligned/text, so they stay
   paired.
3. The VL-SAE (or sweep) trains on the projections as on any paired datasets.

The authors keep the epoch with the best loss on a 20% validation split; we keep the last.
"""

from __future__ import annotations

import logging
import time

import torch

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import check_training_data
from vlsae_ray.config import TrainConfig
from vlsae_ray.provenance import RUN_FILE, read_run_info, write_run_info
from vlsae_ray.sae.aligner import Aligner, AlignerConfig, Modality

log = logging.getLogger(__name__)


def _parts(manifest: store.Manifest, workers: int) -> list[list[store.ShardRecord]]:
    """Each worker's shards: the same indices on both sides of paired datasets."""
    return [list(manifest.shards)[rank::workers] for rank in range(workers)]


def steps_per_epoch(config: TrainConfig) -> int:
    """Full batches of each worker's share, the same for every worker (DDP steps in lockstep)."""
    manifest, workers = store.read_manifest(config.activations), config.training.num_workers
    batch = config.aligner.batch_size // workers
    return min(sum(shard.rows for shard in part) // batch for part in _parts(manifest, workers))


def align_loop_per_worker(loop_config: dict) -> None:
    """One worker: its share of the pairs held in memory (one row per item: the means are small),
    reshuffled every epoch by (seed, epoch, rank)."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    config = TrainConfig.model_validate(loop_config["config"])
    spec, workers = config.aligner, config.training.num_workers
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    v_nd, t_nd = (
        torch.cat(
            [
                store.read_shard(dataset, shard)[0].float()
                for shard in _parts(store.read_manifest(dataset), workers)[rank]
            ]
        ).to(device)
        for dataset in (config.activations, config.text_activations)
    )
    torch.manual_seed(config.training.seed)
    aligner = Aligner(AlignerConfig.model_validate(loop_config["aligner"])).to(device)
    model = DistributedDataParallel(aligner) if workers > 1 else aligner
    steps, batch = steps_per_epoch(config), spec.batch_size // workers
    optimiser = torch.optim.AdamW(aligner.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps * spec.epochs)
    for epoch in range(spec.epochs):
        order = torch.randperm(
            len(v_nd),
            generator=torch.Generator().manual_seed(config.training.seed * 1_000_003 + epoch * 1009 + rank),
        )
        for step in range(steps):
            rows = order[step * batch : (step + 1) * batch].to(device)
            terms = model(v_nd[rows], t_nd[rows])  # text row i is the caption of image row i
            optimiser.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimiser.step()
            schedule.step()
        metrics = {name: float(value) for name, value in terms.items()} | {
            "epoch": epoch + 1,
            "steps": steps * (epoch + 1),
        }
        ray.train.report(metrics)
        if rank == 0:
            log.warning("aligner epoch %d/%d  %s", epoch + 1, spec.epochs, metrics)
    if rank == 0:
        aligner.save(loop_config["output"])
        write_run_info(loop_config["output"], "train-aligner", config, **metrics)


@torch.no_grad()
def project_dataset(aligner: Aligner, source: str, target: str, modality: Modality) -> str:
    """`source`'s rows through the aligner's `modality` projection, to `target`, shard for shard."""
    manifest = store.read_manifest(source)
    header = manifest.model_dump(exclude={"shards", "stats", "rows"})
    projected = store.Manifest.model_validate(
        header
        | {"d": aligner.config.d_proj, "dtype": "float32", "hook_point": f"{manifest.hook_point}:aligned"}
    )
    for record in manifest.shards:  # one shard in memory at a time
        x_nd, ids, token_index = store.read_shard(source, record)
        p_nd = aligner.project(x_nd.float(), modality)
        store.commit(target, projected, [store.write_shard(target, record.index, p_nd, ids, token_index)])
    return target


def run_align(config: TrainConfig) -> tuple[TrainConfig, dict[str, float]]:
    """Train the aligner on the config's paired datasets (Ray Train), save it to OUTPUT/aligner and
    project both datasets; (the config that trains the VL-SAE on the projections, the aligner's
    final metrics)."""
    spec, training = config.aligner, config.training
    d_in = store.read_manifest(config.activations).d
    check_training_data(d_in, config.activations, config.text_activations, paired=True)
    if spec.batch_size % training.num_workers:
        raise ValueError(
            f"aligner.batch_size={spec.batch_size} must split evenly over {training.num_workers} workers"
        )
    if steps_per_epoch(config) == 0:
        raise ValueError(
            f"the datasets have too few rows for one aligner batch of {spec.batch_size} over "
            f"{training.num_workers} workers; lower aligner.batch_size"
        )
    output = storage.join(config.output, "aligner")
    aligned = storage.join(config.output, "aligned")
    images, texts = storage.join(aligned, "image"), storage.join(aligned, "text")
    if _finished(config, output, (images, texts)):  # a resubmitted job goes on with the VL-SAE
        log.warning("reusing the aligner and projections of this config in %s", config.output)
    else:
        storage.check_writable(output)
        for uri in storage.list_prefix(aligned):
            storage.delete(uri)  # another aligner's projections: shards are never overwritten in place
        _fit(
            config, AlignerConfig(d_in=d_in, d_proj=spec.d_proj or d_in, temperature=spec.temperature), output
        )
        aligner = Aligner.load(output)
        project_dataset(aligner, config.activations, images, "vision")
        project_dataset(aligner, config.text_activations, texts, "text")
    results = read_run_info(output)["results"]
    metrics = {f"aligner/{key}": float(value) for key, value in results.items()}
    return config.model_copy(
        update={"activations": images, "text_activations": texts, "aligner": None}
    ), metrics


def _finished(config: TrainConfig, output: str, targets) -> bool:
    """Whether OUTPUT holds this config's aligner and both its projections, complete."""
    if not storage.exists(storage.join(output, RUN_FILE)):
        return False
    if read_run_info(output)["config"] != config.model_dump(mode="json"):
        return False
    return all((m := store.read_manifest_or_none(uri)) is not None and m.complete for uri in targets)


def _fit(config: TrainConfig, aligner_config: AlignerConfig, output: str) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vlsae_ray.local_stack import connect_ray

    training = config.training
    connect_ray()
    trainer = TorchTrainer(
        align_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "aligner": aligner_config.model_dump(),
            "output": output,
        },
        scaling_config=ScalingConfig(
            num_workers=training.num_workers,
            use_gpu=training.use_gpu,
            resources_per_worker={
                "CPU": training.cpus_per_worker,
                **({"GPU": 1} if training.use_gpu else {}),
            },
        ),
        torch_config=TorchConfig(backend="nccl" if training.use_gpu else "gloo"),
        run_config=RunConfig(name=f"vlsae-align-{int(time.time())}"),
    )
    trainer.fit()
