"""Reading a committed activation dataset as Ray Data datasets: for batch jobs and for training.

`shard_dataset` is for jobs that visit every shard once in any order (label; evaluate pairs it
with an embedding dataset).
`ActivationStream` is for training: each data-parallel part reads its own windows of shards
through a Ray Data dataset of its own, in a seeded order, so a run killed midway resumes at the
exact batch it reached and the same config always sees the same batches. Ray Data's
`streaming_split` hands blocks to whichever worker asks first, which is fast but not
reproducible, so the split across workers is ours and each part's dataset keeps its order.
A VL-SAE's stream reads an image-side and a text-side dataset in lockstep (`text_dataset`);
`check_training_data` refuses, before training, datasets a run cannot train on.
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
    return np.concatenate([[0], np.cumsum(manifest.shards.rows, dtype=np.int64)[:-1]]).tolist()


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


def check_training_data(
    d_in: int, activations: str, text_activations: str | None = None, paired: bool = True
) -> None:
    """Refuse datasets an SAE of width `d_in` cannot train on, before any work starts.

    Both sides must have width `d_in`. Paired sides (the shard protocol's pairing) must hold the
    same items in the same shards with one row per item on each side, so that row r of one is
    row r of the other: checked on the manifests (item listing, committed shards, row counts).
    """
    sides = {"activations": activations, "text_activations": text_activations}
    manifests = {key: store.read_manifest(uri) for key, uri in sides.items() if uri}
    for key, manifest in manifests.items():
        if manifest.d != d_in:
            fix = (
                f"set sae.d_in: {manifest.d}"
                if key == "activations"
                else "a VL-SAE encodes both sides with one encoder: give it two datasets of the same width "
                "(e.g. a CLIP's hook points visual and text)"
            )
            raise ValueError(f"sae.d_in is {d_in} but the {key} at {sides[key]!r} have d={manifest.d}; {fix}")
    if text_activations and paired:
        _check_paired(manifests["activations"], manifests["text_activations"])


def _check_paired(images: store.Manifest, texts: store.Manifest) -> None:
    def refuse(what: str) -> None:
        raise ValueError(
            f"activations and text_activations are paired (paired: true) but {what}; extract both hook "
            "points in one `vlsae extract` job over the same source, or set paired: false to train on "
            "two independent datasets"
        )

    if (images.items, images.shard_rows) != (texts.items, texts.shard_rows):
        refuse(
            f"hold {images.items} and {texts.items} items, in shards of {images.shard_rows} and "
            f"{texts.shard_rows} items"
        )
    if images.listing != texts.listing:
        refuse("list other item ids (their manifests' `listing` digests differ)")
    text_rows = {shard.index: shard.rows for shard in texts.shards}
    image_rows = {shard.index: shard.rows for shard in images.shards}
    if image_rows.keys() != text_rows.keys():
        refuse(
            f"have other committed shards ({sorted(image_rows.keys() - text_rows.keys())} only on the "
            f"image side, {sorted(text_rows.keys() - image_rows.keys())} only on the text side: let "
            "both extractions finish)"
        )
    for shard in images.shards:
        items = min(images.shard_rows, images.items - shard.index * images.shard_rows)
        items -= sum(len(ids) for ids in shard.skipped.values())
        if not shard.rows == text_rows[shard.index] == items:
            refuse(
                f"shard {shard.index} holds {shard.rows} image rows and {text_rows[shard.index]} text rows "
                f"for its {items} items: paired training needs one row per item on each side (token cls "
                "or mean, or an embedding hook point such as visual and text)"
            )


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
    runs all parts' batches as one sees the data a data-parallel run sees (`fit_local` on a
    dataset URI does).

    A VL-SAE's stream (`text_dataset`) is two such streams, the image side's and the text side's,
    with the same seed and split, advanced in lockstep: a batch is batch_size // P image rows then
    as many text rows [2 * batch_size // P, d], and `modality_b` (True = text) marks its text half,
    the same for every batch. Paired datasets (the same items in the same shards, one row per item:
    `check_training_data`) then get the same shard order, windows and row shuffles, so text row i
    of a batch is the caption of image row i; unpaired ones are two independent streams. An epoch
    is the shorter side's steps, and a position (epoch, step) is the same on both sides.
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
        text_dataset: str | None = None,
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
        if self._side_steps(0) == 0:
            raise ValueError(
                f"activation dataset {dataset!r} has too few rows for one batch of {batch_size} "
                f"over {parts} data-parallel parts; lower training.batch_size"
            )
        self.text = None
        self.modality_b = None  # one modality: SAETrainer.step takes no flags
        if text_dataset is not None:
            self.text = ActivationStream(
                text_dataset,
                batch_size=batch_size,
                seed=seed,
                window_shards=window_shards,
                part=part,
                parts=parts,
                read_tasks=read_tasks,
            )
            self.modality_b = torch.arange(2 * self.batch) >= self.batch

    def _windows(self, epoch: int, part: int) -> list[tuple[int, list[store.ShardRecord]]]:
        """(window index in the epoch, its shards) of the windows `part` reads in `epoch`."""
        order = _permutation(len(self.manifest.shards), self.seed, epoch).tolist()
        windows = [order[i : i + self.window_shards] for i in range(0, len(order), self.window_shards)]
        return [
            (index, [self.manifest.shards[i] for i in windows[index]])
            for index in range(part, len(windows), self.parts)
        ]

    def steps_in_epoch(self, epoch: int) -> int:
        steps = self._side_steps(epoch)
        return steps if self.text is None else min(steps, self.text.steps_in_epoch(epoch))

    def _side_steps(self, epoch: int) -> int:
        return min(
            sum(shard.rows for _, window in self._windows(epoch, part) for shard in window) // self.batch
            for part in range(self.parts)
        )

    def init_sample(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to `rows` activations from seeded random shards, for the data-dependent init, and their
        modality (None; for a VL-SAE up to `rows` of each side, True = text: paired datasets give
        the same items' rows)."""
        order = _permutation(len(self.manifest.shards), self.seed).tolist()
        parts, total = [], 0
        for i in order:
            activations, _, _ = store.read_shard(self.dataset, self.manifest.shards[i])
            parts.append(activations.float())
            total += activations.shape[0]
            if total >= rows:
                break
        x_nd = torch.cat(parts)[:rows]
        if self.text is None:
            return x_nd, None
        text_nd, _ = self.text.init_sample(rows)
        return torch.cat([x_nd, text_nd]), torch.arange(len(x_nd) + len(text_nd)) >= len(x_nd)

    def windows_dataset(self, epoch: int, start_step: int = 0, steps: int | None = None):
        """This part's windows of `epoch` that hold batches `start_step`..`steps` (default: the
        epoch's end) as a Ray Data dataset, in order, a window's shuffled rows per block (Ray Data
        may cut a large window into several), and how many of its first rows were already consumed.

        Read tasks ask for no CPU: they wait on storage, and must run even where training workers
        hold every CPU; `read_tasks` of them run at a time, reading ahead while training computes.
        """
        import ray

        windows = self._windows(epoch, self.part)
        steps = self.steps_in_epoch(epoch) if steps is None else steps
        first_row, end_row = start_step * self.batch, steps * self.batch
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
        """This part's batches [batch_size // parts, d] (float32; a VL-SAE's [2 * batch_size // parts,
        d], image rows then text rows) of `epoch`, from step `start_step` on."""
        steps = self.steps_in_epoch(epoch)
        if self.text is None:
            yield from self._batches(epoch, start_step, steps)
            return
        image, text = self._batches(epoch, start_step, steps), self.text._batches(epoch, start_step, steps)
        for image_bd, text_bd in zip(image, text, strict=True):
            yield torch.cat([image_bd, text_bd])

    def _batches(self, epoch: int, start_step: int, steps: int) -> Iterator[torch.Tensor]:
        """This side's batches `start_step`..`steps` of `epoch`."""
        if start_step >= steps:
            return
        ds, skip = self.windows_dataset(epoch, start_step, steps)
        buffer, step = np.empty((0, self.manifest.d), np.float32), start_step
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            x_nd = block["x"]  # read-only: it lives in Ray's object store
            drop = min(skip, x_nd.shape[0])
            buffer, skip = np.concatenate([buffer, x_nd[drop:]]), skip - drop
            while buffer.shape[0] >= self.batch and step < steps:
                yield torch.from_numpy(buffer[: self.batch])
                buffer, step = buffer[self.batch :], step + 1
