"""Extraction with Ray Data: image-caption items -> backbone activations at hook points -> committed shards.

The unit of work is a shard, one Ray Data row each, so a shard's rows stay together with no
shuffle and the job streams (early shards are committed while later ones are still being read):

1. The driver lists the source's items (`sources.list_items`); item i belongs to shard
   i // shard_rows. A dataset already at the output is resumed only if it was made with the same
   settings and weights (`_open_manifests`); shards committed in every hook point's dataset are
   skipped.
2. CPU tasks read and preprocess each remaining shard's images (`_decode_shard`). Bad input is
   marked with its reason, never replaced by made-up pixels or text.
3. An actor pool runs the model (`concurrency` actors, `gpus_per_actor` GPUs each when the Ray
   cluster has GPUs and `backbone.device` allows; `vlsae_ray.devices`) over the shard's good
   items, `batch_size` items per forward (`_Extractor`). On CPU an actor holds one
   Ray CPU but runs torch on its share of the node's cores (`cpu_threads`): reserving them all
   would leave no CPU for the decode tasks, which are light and interleave with the forward.
4. CPU tasks write each hook point's shard (`_write_shards`); the driver commits each written shard
   to its dataset as it arrives (one small commit record each, see `store`).

An item is skipped in every hook point's dataset when any hook point lacks its input (the image
for image hooks, the caption for text hooks), so the image-side and text-side datasets of one job
hold the same items in the same order (the pairing VL-SAE needs; see `store`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from vlsae_ray import progress, storage
from vlsae_ray.activations import store
from vlsae_ray.activations.sources import BadInputError, Item, list_items, read_images
from vlsae_ray.backbones import hook_dims, image_preprocessor, load_backbone, required_inputs
from vlsae_ray.config import BackboneConfig, ExtractConfig, SourceConfig
from vlsae_ray.devices import assigned_device, gpu_request
from vlsae_ray.local_stack import connect_ray
from vlsae_ray.provenance import write_run_info

log = logging.getLogger(__name__)

BAD_IMAGE, MISSING_CAPTION = "bad_image", "missing_caption"


class ExtractSummary(BaseModel):
    datasets: dict[str, str]
    rows: dict[str, int]  # per hook point
    items: int
    shards_written: int
    shards_skipped: int
    # items with no rows, per reason, over the whole dataset (this run and the runs it resumes)
    skipped_items: dict[str, int]
    # source files that could not be read at all, and why (their items are unknown)
    unreadable_sources: dict[str, str]


@functools.cache
def _cached_preprocessor(config: BackboneConfig):
    return image_preprocessor(config)


def _bad(item: dict, reason: str, detail: str, fail_fast: bool) -> None:
    if fail_fast:
        raise BadInputError(
            f"item {item['id']!r}: {detail}; fix the source, or set fail_fast: false to skip bad items"
        )
    log.warning("skipping item %s (%s): %s", item["id"], reason, detail)
    item["error"] = reason


def _decode_shard(
    batch: dict[str, np.ndarray],
    source: SourceConfig,
    backbone: BackboneConfig,
    needs_pixels: bool,
    fail_fast: bool,
) -> dict[str, np.ndarray]:
    """Read and preprocess one shard's images: pixels [good items, 3, H, W] as float32 bytes."""
    items = json.loads(str(batch["items"][0]))
    good = [item for item in items if not item["error"]]
    pixels = []
    if needs_pixels:
        preprocess = _cached_preprocessor(backbone)
        images = read_images(source, [Item(i["id"], i["caption"], i["location"], i["key"]) for i in good])
        for item, image in zip(good, images, strict=True):
            if isinstance(image, str):
                _bad(item, BAD_IMAGE, image, fail_fast)
            else:
                pixels.append(preprocess(image))
    pixels_nchw = torch.stack(pixels) if pixels else torch.empty(0)
    return {
        "shard": batch["shard"],
        "items": np.array([json.dumps(items)]),
        "pixels": np.array([_to_bytes(pixels_nchw)], dtype=object),
        "pixels_shape": np.array([json.dumps(list(pixels_nchw.shape))]),
    }


def _to_bytes(x: torch.Tensor) -> bytes:
    return x.contiguous().view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, *shape[1:], dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(*shape)


def _node_cpus() -> int:
    import ray

    node = ray.get_runtime_context().get_node_id()
    return int(next(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node))


class _Extractor:
    """One model replica of the actor pool: a shard's good items in, each hook point's rows out."""

    def __init__(self, config: ExtractConfig, needs: set[str]):
        device = assigned_device()
        if device.type == "cpu":
            torch.set_num_threads(config.cpu_threads or _node_cpus() // config.concurrency or 1)
        self.backbone = load_backbone(config.backbone, device)
        self.config = config
        self.needs = needs

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        config = self.config
        items = json.loads(str(batch["items"][0]))
        good = [item for item in items if not item["error"]]
        pixels_nchw = _from_bytes(
            batch["pixels"][0], torch.float32, *json.loads(str(batch["pixels_shape"][0]))
        )
        parts: dict[str, list] = {hook: [] for hook in config.hook_points}
        for start in range(0, len(good), config.batch_size):
            chunk = good[start : start + config.batch_size]
            outputs = self.backbone.activations(
                config.hook_points,
                pixels=pixels_nchw[start : start + len(chunk)] if len(pixels_nchw) else None,
                texts=[item["caption"] for item in chunk] if "texts" in self.needs else None,
                item_ids=[item["id"] for item in chunk],
                token=config.token,
            )
            for hook, rows in outputs.items():  # item by item already: items stay in shard order
                parts[hook].append((rows.values, rows.item + start, rows.token))
        out = {"shard": batch["shard"], "items": batch["items"]}
        dtype = store.DTYPES[config.dtype]
        for i, hook in enumerate(config.hook_points):
            values, item, token = (
                (torch.cat(column) for column in zip(*parts[hook], strict=True))
                if good
                else (torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int32))
            )
            out[f"values{i}"] = np.array([_to_bytes(values.to(dtype))], dtype=object)
            out[f"item{i}"] = np.array([_to_bytes(item.long())], dtype=object)
            out[f"token{i}"] = np.array([_to_bytes(token.int())], dtype=object)
        return out


def _write_shards(
    batch: dict[str, np.ndarray],
    datasets: dict[str, str],
    dims: dict[str, int],
    committed: dict[str, set[int]],
    dtype: str,
) -> dict[str, np.ndarray]:
    """Write one shard to each hook point's dataset that has not committed it; return the records."""
    index = int(batch["shard"][0])
    items = json.loads(str(batch["items"][0]))
    good_ids = [item["id"] for item in items if not item["error"]]
    skipped: dict[str, list[str]] = {}
    for item in items:
        if item["error"]:
            skipped.setdefault(item["error"], []).append(item["id"])
    hooks, records = [], []
    for i, (hook, dataset) in enumerate(datasets.items()):
        if index in committed[hook]:  # committed shards are immutable, even where another hook's is not
            continue
        values_nd = _from_bytes(batch[f"values{i}"][0], store.DTYPES[dtype], -1, dims[hook])
        item_n = _from_bytes(batch[f"item{i}"][0], torch.int64, -1)
        token_n = _from_bytes(batch[f"token{i}"][0], torch.int32, -1)
        source_ids = [good_ids[j] for j in item_n.tolist()]
        record = store.write_shard(dataset, index, values_nd, source_ids, token_n, skipped)
        hooks.append(hook)
        records.append(record.model_dump_json())
    return {"hook": np.array(hooks, dtype=object), "record": np.array(records, dtype=object)}


def weights_identity(backbone: BackboneConfig) -> str | None:
    """What names the backbone's weights: a checkpoint file's SHA-256 (read once per run, so a changed
    file at the same URI is told apart, and the same file at another URI is not), else the pretrained
    tag (None: the weights are the model's own, e.g. a save_pretrained folder's)."""
    pretrained = backbone.pretrained
    if pretrained is None or not (
        storage.is_s3(pretrained) or pretrained.startswith("file://") or Path(pretrained).is_file()
    ):
        return pretrained
    try:
        checkpoint = storage.read_bytes(pretrained)
    except FileNotFoundError:
        raise ValueError(
            f"backbone.pretrained {pretrained!r}: no checkpoint file there; fix the URI"
        ) from None
    return f"sha256:{hashlib.sha256(checkpoint).hexdigest()}"


# the config setting behind each field of a dataset's header, named when a resume is refused
_SETTINGS = {
    "format": "output",
    "d": "hook_points",
    "dtype": "dtype",
    "library": "backbone.library",
    "model": "backbone.model",
    "weights": "backbone.pretrained",
    "hook_point": "hook_points",
    "token": "token",
    "source": "source",
    "shard_rows": "shard_rows",
    "items": "source",
    "listing": "source",
}


def _open_manifests(
    config: ExtractConfig, datasets: dict[str, str], dims: dict[str, int], items: list[Item]
) -> dict[str, store.Manifest]:
    """Each hook point's dataset: a new one, or the one at its output when this job resumes it."""
    weights = weights_identity(config.backbone)
    manifests = {}
    for hook, dataset in datasets.items():
        fresh = store.Manifest(
            d=dims[hook],
            dtype=config.dtype,
            library=config.backbone.library,
            model=config.backbone.model,
            pretrained=config.backbone.pretrained,
            weights=weights,
            hook_point=hook,
            token=str(config.token),
            source=config.source.model_dump(),
            shard_rows=config.shard_rows,
            items=len(items),
            listing=store.listing_digest([item.id for item in items]),
        )
        existing = store.read_manifest_or_none(dataset)
        if existing is not None:
            theirs, mine = (
                existing.model_dump(include=set(_SETTINGS)),
                fresh.model_dump(include=set(_SETTINGS)),
            )
            differ = [
                f"{_SETTINGS[key]} gave {key}={theirs[key]!r} there, {mine[key]!r} here"
                + (
                    f" (checkpoint {existing.pretrained!r} there, {fresh.pretrained!r} here)"
                    if key == "weights"
                    else ""
                )
                for key in _SETTINGS
                if theirs[key] != mine[key]
            ]
            if differ:
                raise ValueError(
                    f"{dataset!r} already holds a different activation dataset: {'; '.join(differ)}. To "
                    "resume it, set these back to the values it was extracted with; else choose another "
                    "output URI (or delete it)"
                )
            fresh = existing
        manifests[hook] = fresh
    return manifests


def _shard_tasks(
    config: ExtractConfig, items: list[Item], n_shards: int, done: set[int], needs_captions: bool
) -> list[dict]:
    """One row per shard still to write: its items, with those missing a needed caption marked."""
    tasks = []
    for index in range(n_shards):
        if index in done:
            continue
        shard_items = []
        for item in items[index * config.shard_rows : (index + 1) * config.shard_rows]:
            row = {**item._asdict(), "error": ""}
            if needs_captions and not item.caption:
                _bad(row, MISSING_CAPTION, "no caption, and a text hook point needs one", config.fail_fast)
            shard_items.append(row)
        tasks.append({"shard": index, "items": json.dumps(shard_items)})
    return tasks


def _commit_as_written(ds, datasets: dict[str, str], manifests: dict[str, store.Manifest]) -> None:
    try:
        for row in ds.iter_rows():
            # skipped items were logged where they were found; their counts go into the summary
            hook, record = str(row["hook"]), store.ShardRecord.model_validate_json(row["record"])
            manifests[hook] = store.commit(datasets[hook], manifests[hook], [record])
            progress.advance()
    except BadInputError as error:  # Ray's wrapper also carries the task's traceback: keep the message
        raise BadInputError(str(getattr(error, "cause", error))) from None


def run_extract(config: ExtractConfig) -> ExtractSummary:
    """Run (or resume) an extraction job on the Ray cluster this process joins (or a local one)."""
    import ray

    storage.check_writable(config.output)
    dims = hook_dims(config.backbone, config.hook_points)  # fails fast on a bad name
    needs = required_inputs(config.backbone, config.hook_points)
    listing = list_items(config.source)
    if listing.unreadable and config.fail_fast:
        uri, why = next(iter(listing.unreadable.items()))
        raise BadInputError(
            f"cannot read source file {uri!r} ({why}); fix or remove it, or set fail_fast: false to skip it"
        )
    datasets = {hook: storage.join(config.output, hook) for hook in config.hook_points}
    manifests = _open_manifests(config, datasets, dims, listing.items)
    committed = {hook: set(m.shards.indices) for hook, m in manifests.items()}
    done = set.intersection(*committed.values())
    n_shards = next(iter(manifests.values())).n_shards
    tasks = _shard_tasks(config, listing.items, n_shards, done, needs_captions="texts" in needs)
    log.info("extract: %d shards to write, %d already committed", len(tasks), n_shards - len(tasks))
    if tasks:
        connect_ray()
        # a task's BadInputError reaches the driver as itself (wrapped by Ray), not as a generic UDF error
        ray.data.DataContext.get_current().raise_original_map_exception = True
        gpus = gpu_request(
            config.backbone.device, config.gpus_per_actor, "extraction's model actors", "gpus_per_actor"
        )
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        # CPU stages ask for less than the model actor so that Ray Data does not fuse decoding into it
        ds = ds.map_batches(
            _decode_shard,
            num_cpus=0.5,
            fn_kwargs={
                "source": config.source,
                "backbone": config.backbone,
                "needs_pixels": "pixels" in needs,
                "fail_fast": config.fail_fast,
            },
            batch_size=1,
        )
        ds = ds.map_batches(
            _Extractor,
            fn_constructor_args=(config, needs),
            batch_size=1,
            concurrency=config.concurrency,
            num_gpus=gpus,
        )
        ds = ds.map_batches(
            _write_shards,
            num_cpus=0.5,
            fn_kwargs={"datasets": datasets, "dims": dims, "committed": committed, "dtype": config.dtype},
            batch_size=1,
        )
        with progress.stage("extract", len(tasks) * len(datasets), "shards"):
            _commit_as_written(ds, datasets, manifests)
    skipped_items: dict[str, int] = {}
    for skipped in next(iter(manifests.values())).shards.skipped.values():
        for reason, ids in skipped.items():
            skipped_items[reason] = skipped_items.get(reason, 0) + len(ids)
    summary = ExtractSummary(
        datasets=datasets,
        rows={hook: manifest.rows for hook, manifest in manifests.items()},
        items=len(listing.items),
        shards_written=len(tasks),
        shards_skipped=n_shards - len(tasks),
        skipped_items=skipped_items,
        unreadable_sources=listing.unreadable,
    )
    for hook, manifest in manifests.items():  # an empty job still leaves a valid manifest
        manifests[hook] = store.commit(datasets[hook], manifest, [])
        write_run_info(datasets[hook], "extract", config, **summary.model_dump(exclude={"datasets"}))
    return summary
