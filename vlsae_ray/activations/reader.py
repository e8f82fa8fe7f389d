"""Reading a committed activation dataset as Ray Data datasets: for batch jobs and for training.

`shard_dataset` is for jobs that visit every shard once in any order (label; evaluate pairs it
with an embedding dataset).
`ActivationStream` is for training: each data-parallel part reads its own windows of shards
through a Ray Data dataset of its own, in a seeded order, so a run killed midway resumes at the
exact batch it reached and the same config always sees the same batches. Ray Data's
`streaming_split` hands blocks to whichever worker asks first, which is fast but not
reproducible, so the split across workers is ours and each part's dataset keeps its order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from vlsae_ray.activations import store


def shard_offsets(manifest: store.Manifest) -> list[int]:
    """The global row id of each shard's first row (shards in manifest order)."""
    return np.concatenate([[0], np.cumsum([shard.rows for shard in manifest.shards])[:-1]]).tolist()


def shard_dataset(dataset: str):
    """A Ray Data dataset with one row per committed shard: its record (JSON) and first global row.

    Tasks mapped over it read their shard through `storage`, so any worker reads local, file://
    and s3:// datasets alike.
    """
    import ray

    manifest = store.read_manifest(dataset)
    if not manifest.shards:
        raise ValueError(f"activation dataset {dataset!r} has no committed shards")
    items = [
        {"record": record.model_dump_json(), "offset": offset}
        for record, offset in zip(manifest.shards, shard_offsets(manifest), strict=True)
    ]
    return ray.data.from_items(items, override_num_blocks=len(items))


def _permutation(n: int, seed: int, *keys: int) -> torch.Tensor:
    for key in keys:
        seed = (seed * 1_000_003 + key) % 2**62
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _read_window(batch: dict[str, np.ndarray], dataset: str, seed: int) -> dict[str, np.ndarray]:
    """One window's rows, shuffled by (seed, epoch, window), as float32 [rows, d]."""
    epoch, index = int(batch["epoch"][0]), int(batch["index"][0])
    shards = [store.ShardRecord.model_validate(record) for record in json.loads(str(batch["shards"][0]))]
    x_nd = torch.cat([store.read_shard(dataset, shard)[0] for shard in shards])
    return {"x": x_nd[_permutation(x_nd.shape[0], seed, epoch, index)].float().numpy()}


class StreamPosition(NamedTuple):
    """Where a stream stands: the next batch is step `step` of epoch `epoch`."""

    epoch: int = 0
    step: int = 0


class ActivationStream:
    """Seeded, resumable batches of one data-parallel part of an activation dataset.

    Epoch e visits the shards in an order seeded by (seed, e), cut into windows of
    `window_shards` shards (fewer when a part's share is smaller); part p of P reads windows
    p, p + P, p + 2P, ... (so no two parts read the same row in an epoch and each shard is read
    once), shuffles each window's rows (seeded by seed, e and the window) and cuts its rows,
    window after window, into batches of batch_size // P rows. Every part takes the same number
    of steps per epoch (the smallest part's full batches); a part's leftover rows wait for the
    next epoch's order. Global batch t is the parts' batch t together, so a single process that
    runs all parts' batches as one sees the data a data-parallel run sees.
    """

    def __init__(
        self,
        dataset: str,
        *,
        batch_size: int,
        seed: int,
        window_shards: int = 4,
        part: int = 0,
        parts: int = 1,
        read_tasks: int = 2,
    ):
        if batch_size % parts:
            raise ValueError(f"batch_size={batch_size} must be a multiple of the {parts} data-parallel parts")
        if not 0 <= part < parts or window_shards < 1:
            raise ValueError(f"part={part} of {parts} parts, window_shards={window_shards}: not a split")
        self.dataset = dataset
        self.manifest = store.read_manifest(dataset)
        if not self.manifest.shards:
            raise ValueError(f"activation dataset {dataset!r} has no committed shards")
        self.batch = batch_size // parts
        # a window never spans more than a part's share of the shards, so every part gets windows
        self.window_shards = max(1, min(window_shards, len(self.manifest.shards) // parts))
        self.seed, self.part, self.parts, self.read_tasks = seed, part, parts, read_tasks
        steps = self.steps_in_epoch(0)
        if steps == 0:
            raise ValueError(
                f"activation dataset {dataset!r} has too few rows for one batch of {batch_size} "
                f"over {parts} data-parallel parts; lower training.batch_size"
            )

    def _windows(self, epoch: int, part: int) -> list[tuple[int, list[store.ShardRecord]]]:
        """(window index in the epoch, its shards) of the windows `part` reads in `epoch`."""
        order = _permutation(len(self.manifest.shards), self.seed, epoch).tolist()
        windows = [order[i : i + self.window_shards] for i in range(0, len(order), self.window_shards)]
        return [
            (index, [self.manifest.shards[i] for i in windows[index]])
            for index in range(part, len(windows), self.parts)
        ]

    def steps_in_epoch(self, epoch: int) -> int:
        return min(
            sum(shard.rows for _, window in self._windows(epoch, part) for shard in window) // self.batch
            for part in range(self.parts)
        )

    def windows_dataset(self, epoch: int, start_step: int = 0):
        """This part's windows of `epoch` that hold batches `start_step`.. as a Ray Data dataset, in
        order, a window's shuffled rows per block (Ray Data may cut a large window into several),
        and how many of its first rows were already consumed.

        Read tasks ask for no CPU: they wait on storage, and must run even where training workers
        hold every CPU; `read_tasks` of them run at a time, reading ahead while training computes.
        """
        import ray

        windows = self._windows(epoch, self.part)
        first_row, end_row = start_step * self.batch, self.steps_in_epoch(epoch) * self.batch
        rows, todo, skip = 0, [], 0
        for index, shards in windows:
            size = sum(shard.rows for shard in shards)
            if rows + size > first_row and rows < end_row:
                if not todo:
                    skip = first_row - rows
                records = json.dumps([shard.model_dump() for shard in shards])
                todo.append({"epoch": epoch, "index": index, "shards": records})
            rows += size
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            _read_window,
            fn_kwargs={"dataset": self.dataset, "seed": self.seed},
            batch_size=1,
            num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=min(self.read_tasks, len(todo))),
        )
        ds.context.execution_options.preserve_order = True
        return ds, skip

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """This part's batches [batch_size // parts, d] (float32) of `epoch`, from step `start_step` on."""
        steps = self.steps_in_epoch(epoch)
        if start_step >= steps:
            return
        ds, skip = self.windows_dataset(epoch, start_step)
        buffer, step = np.empty((0, self.manifest.d), np.float32), start_step
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            x_nd = block["x"]  # read-only: it lives in Ray's object store
            drop = min(skip, x_nd.shape[0])
            buffer, skip = np.concatenate([buffer, x_nd[drop:]]), skip - drop
            while buffer.shape[0] >= self.batch and step < steps:
                yield torch.from_numpy(buffer[: self.batch])
                buffer, step = buffer[self.batch :], step + 1
