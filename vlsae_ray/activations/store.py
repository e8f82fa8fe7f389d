"""The activation shard store.

Protocol (every reader and writer of activations follows it):

- A dataset is a folder URI (local path, file:// or s3://) holding immutable shards and one
  `manifest.json`; it holds one hook point's activations of one model over the items of one source.
- The source's items are listed in a fixed order (`sources.list_items`) and shard i holds the rows
  of items [i * shard_rows, (i + 1) * shard_rows), each item's rows together and items in order.
  The manifest records the item count and a digest of the ordered item ids (`listing`), so a
  resumed job that would list other items is refused instead of mixing two listings.
- A shard is one safetensors file `shards/shard-{index:06d}.safetensors` with the tensors
  `activations` [rows, d] (the dataset's dtype) and `token_index` [rows] int32, and the metadata
  `source_ids` (a JSON list of the rows' item ids; the only metadata key, so that a shard's bytes,
  and its checksum, are a function of its content). Row r of a shard came from item
  `source_ids[r]`, token `token_index[r]` (-1: a pooled row, from a projection or the `mean` token
  mode), so every activation traces back to its input. An item gives one row (token cls or mean,
  or a hook point with one vector per item), k rows (random) or one per token (all).
- An item with bad input (a corrupt image, a missing caption that a text hook point needs) has no
  rows; its shard's record lists it under `skipped` with the reason. A shard may have fewer rows
  than items, even none, but it is always written and committed, so the item -> shard map holds.
- A shard is written whole and atomically (`storage.write_bytes`: temporary name then rename on
  disk, a single PUT on S3), then committed by listing it in the manifest with its row count and
  SHA-256. Anything in `shards/` that the manifest does not list is not part of the dataset.
- The manifest is replaced atomically as a whole. A shard index always holds the same items, so
  a rerun of an interrupted job skips committed shard indices and never duplicates a row.
- Paired datasets (VL-SAE): the image-side and text-side datasets of one job hold the same items
  in the same shards in the same order, an item being skipped in all of them when any of them
  lacks its input. With one row per item on both sides (cls, mean) row r of one is row r of the
  other; with several, rows pair by (source id, position among that item's rows).
- `stats` in the manifest holds the normalisation statistics over all rows, the mean activation
  and the mean squared norm, set when the last shard is committed (null until then). Each shard's
  record carries its sufficient statistics (sum, sum of squared norms of the stored values).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, computed_field
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vlsae_ray import storage

FORMAT = "vlsae-activations/1"
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ShardRecord(BaseModel):
    index: int
    name: str
    rows: int
    sha256: str
    # Sufficient statistics for the normalisation pass, summed over the shard's rows.
    sum: list[float]
    sum_squared_norm: float
    # reason -> ids of the shard's items that have no rows (bad input)
    skipped: dict[str, list[str]] = {}


class Manifest(BaseModel):
    # `rows` is derived and written for readers' convenience; it is recomputed on load.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    format: str = FORMAT
    d: int
    dtype: str
    model: str
    hook_point: str
    token: str
    # what decides which items land in which shard; a resumed job must use the same
    source: dict = {}
    shard_rows: int = Field(gt=0, description="items per shard")
    items: int = Field(ge=0, description="items listed from the source")
    listing: str = Field("", description="SHA-256 of the ordered item ids (`listing_digest`)")
    shards: list[ShardRecord] = []
    stats: dict | None = None

    @computed_field
    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def n_shards(self) -> int:
        return -(-self.items // self.shard_rows)

    @property
    def complete(self) -> bool:
        return [shard.index for shard in self.shards] == list(range(self.n_shards))


def listing_digest(item_ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(item_ids).encode()).hexdigest()


def normalisation_stats(shards: list[ShardRecord], d: int) -> dict:
    """Mean activation and mean squared norm over the rows of `shards` (from their sums)."""
    rows = max(sum(shard.rows for shard in shards), 1)
    total = np.sum([shard.sum for shard in shards], axis=0) if shards else np.zeros(d)
    return {
        "mean": (total / rows).tolist(),
        "mean_squared_norm": sum(shard.sum_squared_norm for shard in shards) / rows,
    }


def shard_name(index: int) -> str:
    return f"shards/shard-{index:06d}.safetensors"


def read_manifest(dataset: str) -> Manifest:
    uri = storage.join(dataset, MANIFEST)
    try:
        raw = storage.read_text(uri)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no activation dataset at {dataset!r} (missing {MANIFEST}); run `vlsae extract` first"
        ) from None
    return Manifest.model_validate_json(raw)


def read_manifest_or_none(dataset: str) -> Manifest | None:
    try:
        return read_manifest(dataset)
    except FileNotFoundError:
        return None


def commit(dataset: str, manifest: Manifest, records: list[ShardRecord]) -> Manifest:
    """List `records` in the manifest (by shard index, replacing none) and write it atomically.

    The commit that completes the dataset also stores its normalisation statistics.
    """
    known = {shard.index for shard in manifest.shards}
    for record in records:
        if not 0 <= record.index < manifest.n_shards:
            raise ValueError(
                f"shard index {record.index} is outside this dataset's {manifest.n_shards} shards "
                f"({manifest.items} items, {manifest.shard_rows} per shard)"
            )
    new = [record for record in records if record.index not in known]
    shards = sorted([*manifest.shards, *new], key=lambda shard: shard.index)
    manifest = manifest.model_copy(update={"shards": shards})
    if manifest.complete and manifest.stats is None:
        manifest = manifest.model_copy(update={"stats": normalisation_stats(shards, manifest.d)})
    storage.write_text(storage.join(dataset, MANIFEST), manifest.model_dump_json(indent=1))
    return manifest


def write_shard(
    dataset: str,
    index: int,
    activations_nd: torch.Tensor,
    source_ids: list[str],
    token_index: torch.Tensor,
    skipped: dict[str, list[str]] | None = None,
) -> ShardRecord:
    """Write one shard atomically and return its (not yet committed) record."""
    if activations_nd.shape[0] != len(source_ids) or token_index.shape[0] != len(source_ids):
        raise ValueError("a shard needs one source id and one token index per activation row")
    tensors = {"activations": activations_nd.contiguous(), "token_index": token_index.to(torch.int32)}
    # one metadata key: safetensors writes several in no fixed order, and a rerun must write the same bytes
    data = save_safetensors(tensors, metadata={"source_ids": json.dumps(source_ids)})
    name = shard_name(index)
    storage.write_bytes(storage.join(dataset, name), data)
    x = activations_nd.double()
    return ShardRecord(
        index=index,
        name=name,
        rows=len(source_ids),
        sha256=hashlib.sha256(data).hexdigest(),
        sum=x.sum(0).tolist(),
        sum_squared_norm=float((x * x).sum()),
        skipped=skipped or {},
    )


def write_dataset(dataset: str, shards_nd: list[torch.Tensor], dtype: str = "float16") -> Manifest:
    """Commit in-memory activations as a dataset, shard i holding `shards_nd[i]` (row r: source id "i/r").

    For tests, benchmarks and notebooks; extraction jobs write their datasets with `run_extract`.
    """
    records = [
        write_shard(
            dataset, i, x_nd.to(DTYPES[dtype]), [f"{i}/{r}" for r in range(x_nd.shape[0])],
            torch.full((x_nd.shape[0],), -1, dtype=torch.int32),
        )
        for i, x_nd in enumerate(shards_nd)
    ]
    shard_rows = max(x_nd.shape[0] for x_nd in shards_nd)
    manifest = Manifest(
        d=shards_nd[0].shape[1], dtype=dtype, model="in-memory", hook_point="in-memory", token="cls",
        shard_rows=shard_rows, items=shard_rows * (len(shards_nd) - 1) + shards_nd[-1].shape[0],
    )
    return commit(dataset, manifest, records)


def read_shard(
    dataset: str, record: ShardRecord, verify: bool = True
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(activations [rows, d], source ids, token index) of one committed shard."""
    uri = storage.join(dataset, record.name)
    data = storage.read_bytes(uri)
    if verify and hashlib.sha256(data).hexdigest() != record.sha256:
        raise ValueError(f"shard {uri!r} does not match its manifest checksum: it was changed or is corrupt")
    tensors = load_safetensors(data)
    source_ids = json.loads(_safetensors_metadata(data)["source_ids"])
    return tensors["activations"], source_ids, tensors["token_index"]


def _safetensors_metadata(data: bytes) -> dict:
    header_size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_size]).get("__metadata__", {})


def iter_shards(dataset: str) -> Iterator[tuple[torch.Tensor, list[str], torch.Tensor]]:
    manifest = read_manifest(dataset)
    for record in manifest.shards:
        yield read_shard(dataset, record)


def load_activations(dataset: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[str]]:
    """The whole dataset in memory as ([N, d], source ids): for small datasets, notebooks and tests."""
    parts, ids = [], []
    for activations, source_ids, _ in iter_shards(dataset):
        parts.append(activations.to(dtype))
        ids.extend(source_ids)
    if not parts:
        raise ValueError(f"activation dataset {dataset!r} has no committed shards")
    return torch.cat(parts), ids
