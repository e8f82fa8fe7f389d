"""Reading a committed activation dataset: as a Ray Data dataset (batch jobs) or as a training stream.

`shard_dataset` is for jobs that visit every shard once in any order (label; evaluate pairs it
with an embedding dataset).
`ActivationStream` is for training: a deterministic order, so a run killed midway resumes at the
exact batch it reached and the same config always sees the same batches. Ray Data's
`streaming_split` hands blocks to whichever worker asks first, which is fast but not
reproducible, so training reads shards itself (in a background thread, through `storage`).
"""

from __future__ import annotations

import concurrent.futures
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
        self.seed, self.part, self.parts = seed, part, parts
        steps = self.steps_in_epoch(0)
        if steps == 0:
            raise ValueError(
                f"activation dataset {dataset!r} has too few rows for one batch of {batch_size} "
                f"over {parts} data-parallel parts; lower training.batch_size"
            )

    def _permutation(self, n: int, *keys: int) -> torch.Tensor:
        seed = self.seed
        for key in keys:
            seed = (seed * 1_000_003 + key) % 2**62
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def _windows(self, epoch: int, part: int) -> list[tuple[int, list[store.ShardRecord]]]:
        """(window index in the epoch, its shards) of the windows `part` reads in `epoch`."""
        order = self._permutation(len(self.manifest.shards), epoch).tolist()
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

    def _read_window(self, epoch: int, index: int, window: list[store.ShardRecord]) -> torch.Tensor:
        x_nd = torch.cat([store.read_shard(self.dataset, shard)[0] for shard in window])
        return x_nd[self._permutation(x_nd.shape[0], epoch, index)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """This part's batches [batch_size // parts, d] (float32) of `epoch`, from step `start_step` on."""
        windows, steps = self._windows(epoch, self.part), self.steps_in_epoch(epoch)
        skip = start_step * self.batch  # rows of this part's epoch already consumed
        first = 0
        while first < len(windows) and skip >= (rows := sum(s.rows for s in windows[first][1])):
            skip, first = skip - rows, first + 1
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # reads the next window during compute
            pending = [pool.submit(self._read_window, epoch, *windows[first])] if first < len(windows) else []
            buffer = torch.empty(0, self.manifest.d)
            step = start_step
            for i in range(first, len(windows)):
                window = pending.pop(0).result()
                if i + 1 < len(windows):
                    pending.append(pool.submit(self._read_window, epoch, *windows[i + 1]))
                buffer = torch.cat([buffer, window[skip:].float()])
                skip = 0
                while buffer.shape[0] >= self.batch and step < steps:
                    yield buffer[: self.batch]
                    buffer, step = buffer[self.batch :], step + 1
                if step == steps:
                    for future in pending:
                        future.cancel()
                    return
