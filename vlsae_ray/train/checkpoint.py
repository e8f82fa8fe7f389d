"""Training checkpoints in the object store, beside the SAEs they train, so any run can resume.

Layout, SAE being each SAE's folder (the job's OUTPUT, or OUTPUT/sweep-NN for a sweep):

    SAE/checkpoints/step-000000120/rank-0003.safetensors   that rank's SAE parameters and buffers
    SAE/checkpoints/step-000000120/rank-0003.trainer.pt    its optimiser, schedule and dead-latent state
    OUTPUT/checkpoints/latest.json                        the job's commit record

Every rank writes its own files of every SAE of the job (a latent shard holds a different part
of an SAE; data-parallel ranks hold the same one, and each writes it so restoring needs no
communication). Under DeepSpeed ZeRO the optimiser state in `trainer.pt` is the rank's partition
of Adam's moments and fp32 master weights, so each rank restores exactly the part it steps.

After a barrier, rank 0 replaces `latest.json`, {"step", "epoch", "step_in_epoch", "kept", "run"}:
that one write commits the checkpoint of every SAE of the job, so a job killed at any point
(even between two SAEs' files) resumes with all of them from the last record, and files of a
step no record names are never read. After a second barrier each rank deletes its files of the
steps the record does not keep (`kept`, the newest `keep_checkpoints`), so the files a record
names go only once a newer record has replaced it.

`run` holds what fixes the data position, the schedule and the saved state's form
(`run_fields`): the datasets' identity (and a VL-SAE's pairing), batch size, seed, shuffle
window, epochs, learning rate, layout, ZeRO stage and every SAE's config. A resume that changes
any of them is refused before any worker starts (`check_resume`), naming each change.
checkpoint_every, keep_checkpoints, max_failures, read_tasks, cpus_per_worker, use_gpu and the
datasets' URIs may change.
"""

from __future__ import annotations

import io
import json

import safetensors.torch
import torch
import torch.distributed as dist

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import StreamPosition
from vlsae_ray.config import TrainConfig
from vlsae_ray.train.step import SAETrainer

LATEST = "latest.json"
# The training options a resume must keep; the others (checkpointing, failures, resources) may change.
RESUME_OPTIONS = (
    "batch_size",
    "epochs",
    "seed",
    "lr",
    "window_shards",
    "num_workers",
    "latent_shards",
    "zero_stage",
)
# What identifies the dataset (not its URI, so a moved copy resumes)
DATASET_IDENTITY = ("listing", "items", "rows", "d", "model", "hook_point")


def run_fields(config: TrainConfig) -> dict:
    """{"training.batch_size": 1024, "sae.k": 32, "activations.listing": ..., ...}: what a resume must keep.

    A sweep's SAEs are named by their folders (`sweep-01.k`); a VL-SAE's text-side dataset and
    pairing are kept as well.
    """
    fields = {f"training.{name}": getattr(config.training, name) for name in RESUME_OPTIONS}
    datasets = {"activations": config.activations, "text_activations": config.text_activations}
    for side, uri in datasets.items():
        if uri is not None:
            manifest = store.read_manifest(uri)
            fields.update({f"{side}.{name}": getattr(manifest, name) for name in DATASET_IDENTITY})
            fields[f"{side}.shards"] = len(manifest.shards)
    if config.text_activations is not None:
        fields["paired"] = config.paired
    for output, sae in config.sae_runs():
        name = output.rstrip("/").rsplit("/", 1)[-1] if config.sweep else "sae"
        fields.update({f"{name}.{key}": value for key, value in sae.model_dump(mode="json").items()})
    return json.loads(json.dumps(fields))  # as the record holds them (tuples become lists)


def latest(output: str) -> dict | None:
    """The job's commit record under `output`, or None."""
    try:
        return json.loads(storage.read_text(storage.join(output, "checkpoints", LATEST)))
    except FileNotFoundError:
        return None


def check_resume(output: str, fields: dict) -> dict | None:
    """The commit record to resume from (None: a fresh start); a ValueError naming each changed field."""
    record = latest(output)
    if record is None:
        return None
    recorded = record.get("run", {})
    changed = [
        f"{name} was {_shown(recorded, name)}, now {_shown(fields, name)}"
        for name in sorted(recorded.keys() | fields.keys())
        if name not in recorded or name not in fields or recorded[name] != fields[name]
    ]
    if changed:
        raise ValueError(
            f"{output!r} holds a checkpoint at step {record['step']} of another run: {'; '.join(changed)}. "
            "Set these back to resume it, or train into a new output"
        )
    return record


def _shown(fields: dict, name: str) -> str:
    return json.dumps(fields[name]) if name in fields else "unset"


def _folder(output: str, step: int) -> str:
    return storage.join(output, "checkpoints", f"step-{step:09d}")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save(
    output: str, runs: list[tuple[str, SAETrainer]], position: StreamPosition, fields: dict, keep: int
) -> None:
    """Write and commit this rank's part of the job's checkpoint (collective: every rank calls it).

    `runs` are (SAE folder, trainer) of every SAE of the job, all at the same step; `fields` are the
    job's `run_fields`.
    """
    rank, step = _rank(), runs[0][1].steps
    for sae_output, trainer in runs:
        folder = _folder(sae_output, step)
        state = {name: t.detach().cpu().contiguous() for name, t in trainer.sae.state_dict().items()}
        storage.write_bytes(
            storage.join(folder, f"rank-{rank:04d}.safetensors"), safetensors.torch.save(state)
        )
        buffer = io.BytesIO()
        torch.save(trainer.state_dict(), buffer)
        storage.write_bytes(storage.join(folder, f"rank-{rank:04d}.trainer.pt"), buffer.getvalue())
    earlier = (latest(output) or {}).get("kept", [])
    kept = [*[s for s in earlier if s != step], step][-keep:]
    _barrier()  # every rank's files of every SAE are written: commit
    if rank == 0:
        record = {
            "step": step,
            "epoch": position.epoch,
            "step_in_epoch": position.step,
            "kept": kept,
            "run": fields,
        }
        storage.write_text(storage.join(output, "checkpoints", LATEST), json.dumps(record))
    _barrier()
    for old_step in set(earlier) - set(kept):
        for sae_output, _ in runs:
            for suffix in ("safetensors", "trainer.pt"):
                storage.delete(storage.join(_folder(sae_output, old_step), f"rank-{rank:04d}.{suffix}"))


def restore(output: str, runs: list[tuple[str, SAETrainer]], fields: dict) -> StreamPosition:
    """Load the job's last committed checkpoint into every trainer and its SAE; where the stream goes on.

    Refuses (`check_resume`) a checkpoint whose `run_fields` differ from `fields`.
    """
    record = check_resume(output, fields)
    if record is None:
        return StreamPosition()
    rank = _rank()
    for sae_output, trainer in runs:
        folder = _folder(sae_output, record["step"])
        device = trainer.sae.b_dec_d.device
        weights = safetensors.torch.load(
            storage.read_bytes(storage.join(folder, f"rank-{rank:04d}.safetensors"))
        )
        trainer.sae.load_state_dict({name: t.to(device) for name, t in weights.items()})
        with torch.serialization.safe_globals(trainer.state_globals()):
            state = torch.load(
                io.BytesIO(storage.read_bytes(storage.join(folder, f"rank-{rank:04d}.trainer.pt"))),
                map_location=device,
                weights_only=True,
            )
        trainer.load_state_dict(state)
    return StreamPosition(record["epoch"], record["step_in_epoch"])
