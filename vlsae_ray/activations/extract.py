"""Extraction with Ray Data: images -> backbone activations at hook points -> committed shards.

Stages: CPU tasks make and preprocess the images; an actor pool runs the model (on a GPU when
one is visible); a group-by on the shard index collects each shard's rows, which one task
writes per hook point; the driver commits each written shard to its dataset's manifest as it
arrives. Item i always lands in shard i // shard_rows, so a rerun skips committed shards.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from pydantic import BaseModel

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.sources import load_image, source_items
from vlsae_ray.backbones import Backbone, hook_dims, image_preprocessor
from vlsae_ray.config import BackboneConfig, ExtractConfig
from vlsae_ray.local_stack import connect_ray
from vlsae_ray.provenance import write_run_info

log = logging.getLogger(__name__)


class ExtractSummary(BaseModel):
    datasets: dict[str, str]
    rows: int
    shards_written: int
    shards_skipped: int


@functools.cache
def _cached_preprocessor(config: BackboneConfig):
    return image_preprocessor(config)


def _preprocess(batch: dict[str, np.ndarray], backbone: BackboneConfig) -> dict[str, np.ndarray]:
    preprocess = _cached_preprocessor(backbone)
    pixels = [preprocess(load_image(str(item_id))).numpy() for item_id in batch["id"]]
    return {**batch, "pixels": np.stack(pixels)}


class _Extractor:
    """One model replica of the actor pool."""

    def __init__(self, config: ExtractConfig):
        self.backbone = Backbone(config.backbone)
        self.hook_points = config.hook_points
        self.token = config.token.mode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.backbone.activations(
            torch.from_numpy(batch.pop("pixels")), self.hook_points, self.token
        )
        return {**batch, **{f"act{i}": outputs[hook].numpy() for i, hook in enumerate(self.hook_points)}}


def _write_shard_group(
    batch: dict[str, np.ndarray], datasets: dict[str, str], committed: dict[str, set[int]], dtype: str
) -> dict[str, np.ndarray]:
    order = np.argsort(batch["position"])
    index = int(batch["shard"][0])
    source_ids = [str(batch["id"][i]) for i in order]
    hooks, records = [], []
    for i, (hook, dataset) in enumerate(datasets.items()):
        if index in committed[hook]:  # committed shards are immutable, even where another hook's is not
            continue
        # after the shuffle a tensor column may arrive as an object array of rows
        activations_nd = np.stack([np.asarray(row, dtype=np.float32) for row in batch[f"act{i}"][order]])
        activations = torch.from_numpy(activations_nd).to(store.DTYPES[dtype])
        token_index = torch.zeros(len(source_ids), dtype=torch.int32)  # CLS
        record = store.write_shard(dataset, index, activations, source_ids, token_index)
        hooks.append(hook)
        records.append(record.model_dump_json())
    return {"hook": np.array(hooks), "record": np.array(records)}


def _open_manifests(config: ExtractConfig, dims: dict[str, int]) -> dict[str, store.Manifest]:
    manifests = {}
    for hook, d in dims.items():
        dataset = storage.join(config.output, hook)
        fresh = store.Manifest(
            d=d,
            dtype=config.dtype,
            model=config.backbone.model,
            hook_point=hook,
            token=str(config.token),
            source=config.source.model_dump(),
            shard_rows=config.shard_rows,
        )
        existing = store.read_manifest_or_none(dataset)
        if existing is not None:
            mine = fresh.model_dump(exclude={"shards", "rows", "stats"})
            theirs = existing.model_dump(exclude={"shards", "rows", "stats"})
            differ = {key: (theirs[key], mine[key]) for key in mine if mine[key] != theirs[key]}
            if differ:
                raise ValueError(
                    f"{dataset!r} already holds a different activation dataset (existing vs requested: "
                    f"{differ}); choose another output URI or delete it"
                )
            fresh = existing
        manifests[hook] = fresh
    return manifests


def run_extract(config: ExtractConfig) -> ExtractSummary:
    """Run (or resume) an extraction job on the Ray cluster this process joins (or a local one)."""
    import ray

    storage.check_writable(config.output)
    dims = hook_dims(config.backbone, config.hook_points, config.token.mode)  # fails fast on a bad name
    manifests = _open_manifests(config, dims)
    datasets = {hook: storage.join(config.output, hook) for hook in config.hook_points}
    items = source_items(config.source)
    n_shards = -(-len(items) // config.shard_rows)
    committed_per_hook = {hook: {shard.index for shard in m.shards} for hook, m in manifests.items()}
    committed = set.intersection(*committed_per_hook.values())
    rows = [
        {"id": item["id"], "shard": i // config.shard_rows, "position": i % config.shard_rows}
        for i, item in enumerate(items)
        if i // config.shard_rows not in committed
    ]
    todo = n_shards - len(committed & set(range(n_shards)))
    log.info("extract: %d shards to write, %d already committed", todo, n_shards - todo)
    if rows:
        connect_ray()
        use_gpu = torch.cuda.is_available() and config.backbone.device != "cpu"
        ds = ray.data.from_items(rows)
        ds = ds.map_batches(
            _preprocess, fn_kwargs={"backbone": config.backbone}, batch_size=config.batch_size
        )
        ds = ds.map_batches(
            _Extractor,
            fn_constructor_args=(config,),
            batch_size=config.batch_size,
            concurrency=config.concurrency,
            num_gpus=1 if use_gpu else 0,
        )
        ds = ds.groupby("shard", num_partitions=min(todo, 200)).map_groups(
            _write_shard_group,
            fn_kwargs={"datasets": datasets, "committed": committed_per_hook, "dtype": config.dtype},
        )
        for row in ds.iter_rows():
            hook = str(row["hook"])
            manifests[hook] = store.commit(
                datasets[hook], manifests[hook], [store.ShardRecord.model_validate_json(row["record"])]
            )
    for hook, manifest in manifests.items():  # an empty job still leaves a valid manifest
        manifests[hook] = store.commit(datasets[hook], manifest, [])
        write_run_info(datasets[hook], "extract", config, rows=manifests[hook].rows)
    return ExtractSummary(
        datasets=datasets,
        rows=next(iter(manifests.values())).rows,
        shards_written=todo,
        shards_skipped=n_shards - todo,
    )
