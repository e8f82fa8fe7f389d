"""Training checkpoints in the object store, beside the SAE they train, so any run can resume.

Layout under the run's output URI:

    checkpoints/step-000000120/rank-0003.safetensors   that rank's SAE parameters and buffers
    checkpoints/step-000000120/rank-0003.trainer.pt    its optimiser, schedule and dead-latent state
    checkpoints/latest.json                           {"step", "epoch", "step_in_epoch", layout, zero_stage}

Every rank writes its own files (a latent shard holds a different part of the SAE; data-parallel
ranks hold the same one, and each writes it so restoring needs no communication). Under DeepSpeed
ZeRO the optimiser state in `trainer.pt` is the rank's partition of Adam's moments and fp32
master weights, so each rank restores exactly the part it steps. After a barrier, rank 0 replaces
`latest.json`: that write commits the checkpoint, so a run killed while writing resumes from the
previous one. Restoring needs the same world size, latent shards and ZeRO stage.
"""

from __future__ import annotations

import io
import json

import safetensors.torch
import torch
import torch.distributed as dist

from vlsae_ray import storage
from vlsae_ray.activations.reader import StreamPosition
from vlsae_ray.train.parallel import ParallelLayout
from vlsae_ray.train.step import SAETrainer

LATEST = "latest.json"


def _folder(output: str, step: int) -> str:
    return storage.join(output, "checkpoints", f"step-{step:09d}")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(
    output: str, trainer: SAETrainer, position: StreamPosition, layout: ParallelLayout, keep: int
) -> None:
    """Write this rank's part of the checkpoint at `trainer.steps` (collective: every rank calls it)."""
    rank = _rank()
    folder = _folder(output, trainer.steps)
    state = {name: t.detach().cpu().contiguous() for name, t in trainer.sae.state_dict().items()}
    storage.write_bytes(storage.join(folder, f"rank-{rank:04d}.safetensors"), safetensors.torch.save(state))
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    storage.write_bytes(storage.join(folder, f"rank-{rank:04d}.trainer.pt"), buffer.getvalue())
    earlier = (latest(output) or {}).get("kept", [])
    kept = [*[step for step in earlier if step != trainer.steps], trainer.steps][-keep:]
    _barrier()  # every rank's files are written: commit
    if rank == 0:
        info = {
            "step": trainer.steps,
            "epoch": position.epoch,
            "step_in_epoch": position.step,
            "data_parallel": layout.data_parallel,
            "latent_shards": layout.latent_shards,
            "zero_stage": trainer.zero_stage,
            "kept": kept,
        }
        storage.write_text(storage.join(output, "checkpoints", LATEST), json.dumps(info))
    _barrier()
    for step in set(earlier) - set(kept):
        for suffix in ("safetensors", "trainer.pt"):
            storage.delete(storage.join(_folder(output, step), f"rank-{rank:04d}.{suffix}"))


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def latest(output: str) -> dict | None:
    try:
        return json.loads(storage.read_text(storage.join(output, "checkpoints", LATEST)))
    except FileNotFoundError:
        return None


def restore(output: str, trainer: SAETrainer, layout: ParallelLayout) -> StreamPosition:
    """Load the latest committed checkpoint into `trainer` and its SAE; return where the stream goes on."""
    info = latest(output)
    if info is None:
        return StreamPosition()
    if (info["data_parallel"], info["latent_shards"]) != (layout.data_parallel, layout.latent_shards):
        raise ValueError(
            f"the checkpoint at {output!r} step {info['step']} was written by {info['data_parallel']} "
            f"data-parallel x {info['latent_shards']} latent-shard workers, but this run has "
            f"{layout.data_parallel} x {layout.latent_shards}; resume with that layout or use a new output"
        )
    if info.get("zero_stage") != trainer.zero_stage:  # its optimiser state has another form
        raise ValueError(
            f"the checkpoint at {output!r} step {info['step']} was written with zero_stage "
            f"{info.get('zero_stage')}, but this run has {trainer.zero_stage}; resume with that stage or use "
            "a new output"
        )
    rank = _rank()
    folder = _folder(output, info["step"])
    device = trainer.sae.b_dec_d.device
    weights = safetensors.torch.load(storage.read_bytes(storage.join(folder, f"rank-{rank:04d}.safetensors")))
    trainer.sae.load_state_dict({name: t.to(device) for name, t in weights.items()})
    with torch.serialization.safe_globals(trainer.state_globals()):
        state = torch.load(
            io.BytesIO(storage.read_bytes(storage.join(folder, f"rank-{rank:04d}.trainer.pt"))),
            map_location=device,
            weights_only=True,
        )
    trainer.load_state_dict(state)
    return StreamPosition(info["epoch"], info["step_in_epoch"])
