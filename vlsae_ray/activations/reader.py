"""Reading a committed activation dataset as a Ray Data dataset (for Ray Train and batch jobs)."""

from __future__ import annotations

import numpy as np
import torch

from vlsae_ray.activations import store


def _read_shards(batch: dict[str, np.ndarray], dataset: str) -> dict[str, np.ndarray]:
    xs, ids = [], []
    for record_json in batch["record"]:
        activations, source_ids, _ = store.read_shard(
            dataset, store.ShardRecord.model_validate_json(str(record_json))
        )
        xs.append(activations.to(torch.float32).numpy())
        ids.extend(source_ids)
    return {"x": np.concatenate(xs), "source_id": np.array(ids)}


def activation_dataset(dataset: str, *, shuffle_seed: int | None = None, num_cpus: float = 0.5):
    """A Ray Data dataset with columns `x` ([d] float32) and `source_id`, one row per activation.

    Shards are read by Ray tasks through `storage`, so any worker reads local, file:// and s3://
    datasets alike. With `shuffle_seed`, shards are visited in a seeded random order; combine it
    with `local_shuffle_buffer_size` when iterating for a row-level shuffle.
    """
    import ray

    manifest = store.read_manifest(dataset)
    if not manifest.shards:
        raise ValueError(f"activation dataset {dataset!r} has no committed shards")
    records = [{"record": record.model_dump_json()} for record in manifest.shards]
    ds = ray.data.from_items(records, override_num_blocks=len(records))
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=shuffle_seed)
    return ds.map_batches(_read_shards, fn_kwargs={"dataset": dataset}, batch_size=1, num_cpus=num_cpus)
