"""The activation shard store.

Protocol (every reader and writer of activations follows it):

- A dataset is a folder URI (local path, file:// or s3://) holding immutable shards, one small
  commit record per shard, compacted index files and a header `manifest.json`; it holds one hook
  point's activations of one model over the items of one source.
- The source's items are listed in a fixed order (`sources.list_items`) and shard i holds the rows
  of items [i * shard_rows, (i + 1) * shard_rows), each item's rows together and items in order.
  The header records the item count and a digest of the ordered item ids (`listing`), so a
  resumed job that would list other items is refused instead of mixing two listings; it also
  records the backbone (library, model, and `weights`: a checkpoint file's SHA-256, or the
  pretrained tag), so a resume with other weights is refused too.
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
- Every object is written whole and atomically (`storage.write_bytes`: temporary name then rename
  on disk, a single PUT on S3), in this order:
  1. `manifest.json`, the header (format, d, dtype, model, hook point, token, source, listing), by
     the first commit; rewritten once, by the commit that completes the dataset, to add `stats`.
  2. the shard, then its commit record `commits/shard-{index:06d}.json` (index, rows, SHA-256,
     skipped, and the shard's sufficient statistics: row count, sum, sum of squared norms). A
     shard is committed once its record exists; anything in `shards/` without one is not part of
     the dataset. A commit costs one small PUT, whatever the number of shards.
  3. compaction of a range, once all its shards are committed: range k holds shards
     [k * INDEX_RANGE, (k + 1) * INDEX_RANGE). Its statistics, summed, go to
     `stats/range-{k:06d}.json`, then its records, as columns, to `index/range-{k:06d}.json`; then
     its commit records are deleted. Readers load a million shards' records from a thousand index
     files instead of a million commit records (S3 LISTs 1000 keys per call).
- Reading: list `commits/`, then list `index/`, load every index file, then the commit records of
  shards that no index file holds. A commit record whose range has an index file (a compaction
  stopped before deleting it) is ignored; one deleted between the listing and its GET is in its
  range's index file, which is then read. So a reader sees every committed shard exactly once,
  whether a compaction finished, stopped halfway or runs while it reads.
- One writer per dataset (the extraction driver) commits; any number of readers read at any time.
  A shard index always holds the same items, so a rerun of an interrupted job skips committed
  shard indices and never duplicates a row; a commit of an already committed index is ignored.
- Paired datasets (VL-SAE): the image-side and text-side datasets of one job hold the same items
  in the same shards in the same order, an item being skipped in all of them when any of them
  lacks its input. With one row per item on both sides (cls, mean) row r of one is row r of the
  other; with several, rows pair by (source id, position among that item's rows).
- `stats` in the header holds the normalisation statistics over all rows, the mean activation and
  the mean squared norm, set by the commit that completes the dataset (null until then) from the
  ranges' summed statistics.
- Format `vlsae-activations/1` (every record, with its d-long sum, inline in `manifest.json`,
  rewritten whole at each commit) is still read; appending to it is refused.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, computed_field, field_validator
from pydantic_core import from_json
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vlsae_ray import storage

FORMAT = "vlsae-activations/2"
FORMAT_V1 = "vlsae-activations/1"
MANIFEST = "manifest.json"
# shards per compacted index file: one S3 LIST page of commit records
INDEX_RANGE = 1000
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ShardStats(BaseModel):
    """Sufficient statistics of rows for the normalisation pass: sums, so they add over shards."""

    rows: int = 0
    sum: list[float]
    sum_squared_norm: float = 0.0

    @classmethod
    def total(cls, stats: Iterable[ShardStats], d: int) -> ShardStats:
        stats = list(stats)
        return cls(
            rows=sum(s.rows for s in stats),
            sum=np.sum([s.sum for s in stats], axis=0).tolist() if stats else [0.0] * d,
            sum_squared_norm=sum(s.sum_squared_norm for s in stats),
        )


class ShardRecord(BaseModel):
    index: int
    name: str
    rows: int
    sha256: str
    # reason -> ids of the shard's items that have no rows (bad input)
    skipped: dict[str, list[str]] = {}
    # the shard's statistics, carried from `write_shard` to its commit record; records read back
    # from a dataset have none (its ranges keep them, summed, apart from the records)
    stats: ShardStats | None = None


class ShardTable(Sequence):
    """Committed shards' records as columns, sorted by index; a ShardRecord is built when read.

    A million records take seconds to build as pydantic objects and about a GiB to hold; as
    columns they load in a fraction of that, and a commit inserts one in O(log n) + a memmove.
    """

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.rows: list[int] = []
        self.sha256: list[str] = []
        self.skipped: dict[int, dict[str, list[str]]] = {}

    @classmethod
    def of(cls, records: Iterable[ShardRecord]) -> ShardTable:
        table = cls()
        for record in records:
            table.add(record)
        return table

    def add_columns(self, columns: dict) -> None:
        """Add an index file's shards (appended in one go when they all come after the table's)."""
        skipped = {int(i): reasons for i, reasons in columns["skipped"].items()}
        if self.indices and columns["index"][0] <= self.indices[-1]:
            for index, rows, sha256 in zip(columns["index"], columns["rows"], columns["sha256"], strict=True):
                self.add(_record(index, rows, sha256, skipped.get(index, {})))
            return
        self.indices += columns["index"]
        self.rows += columns["rows"]
        self.sha256 += columns["sha256"]
        self.skipped.update(skipped)

    def columns(self, start: int, stop: int) -> dict:
        """The columns of the shards at positions [start, stop), as an index file holds them."""
        index = self.indices[start:stop]
        skipped = {str(i): self.skipped[i] for i in index if i in self.skipped}
        return {
            "index": index,
            "rows": self.rows[start:stop],
            "sha256": self.sha256[start:stop],
            "skipped": skipped,
        }

    def position(self, index: int) -> int:
        return bisect.bisect_left(self.indices, index)

    def __contains__(self, index: object) -> bool:
        position = self.position(index)
        return position < len(self.indices) and self.indices[position] == index

    def add(self, record: ShardRecord) -> bool:
        """Insert `record` unless its index is already there; True if it was inserted."""
        if record.index in self:
            return False
        position = self.position(record.index)
        self.indices.insert(position, record.index)
        self.rows.insert(position, record.rows)
        self.sha256.insert(position, record.sha256)
        if record.skipped:
            self.skipped[record.index] = record.skipped
        return True

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        index = self.indices[position]
        return _record(index, self.rows[position], self.sha256[position], self.skipped.get(index, {}))

    def __iter__(self) -> Iterator[ShardRecord]:
        return (self[position] for position in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShardTable):
            return (self.indices, self.rows, self.sha256, self.skipped) == (
                other.indices,
                other.rows,
                other.sha256,
                other.skipped,
            )
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"ShardTable({len(self)} shards)"


def _record(index: int, rows: int, sha256: str, skipped: dict[str, list[str]]) -> ShardRecord:
    return ShardRecord(index=index, name=shard_name(index), rows=rows, sha256=sha256, skipped=skipped)


class Manifest(BaseModel):
    """A dataset's header and its committed shards (`shards`, by index)."""

    # `rows` is derived and written for readers' convenience; it is recomputed on load.
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), arbitrary_types_allowed=True)

    format: str = FORMAT
    d: int
    dtype: str
    # the backbone: library and model, and the weights' identity (`extract.weights_identity`)
    library: str = "open_clip"
    model: str
    pretrained: str | None = None
    weights: str | None = None
    hook_point: str
    token: str
    # what decides which items land in which shard; a resumed job must use the same
    source: dict = {}
    shard_rows: int = Field(gt=0, description="items per shard")
    items: int = Field(ge=0, description="items listed from the source")
    listing: str = Field("", description="SHA-256 of the ordered item ids (`listing_digest`)")
    shards: ShardTable = Field(default_factory=ShardTable)
    stats: dict | None = None
    # statistics of committed shards whose range is not compacted yet, by shard index
    _pending: dict[int, ShardStats] = PrivateAttr(default_factory=dict)

    @field_validator("shards", mode="before")
    @classmethod
    def _records(cls, value: object) -> object:
        if isinstance(value, ShardTable):
            return value
        return ShardTable.of(ShardRecord.model_validate(record) for record in value)

    @computed_field
    @property
    def rows(self) -> int:
        return sum(self.shards.rows)

    @property
    def n_shards(self) -> int:
        return -(-self.items // self.shard_rows)

    @property
    def complete(self) -> bool:
        # a table holds each index once, and commit admits only indices below n_shards
        return len(self.shards) == self.n_shards

    def _range(self, k: int) -> range:
        return range(k * INDEX_RANGE, min((k + 1) * INDEX_RANGE, self.n_shards))

    def _range_complete(self, k: int) -> bool:
        shards = self._range(k)
        return self.shards.position(shards.stop) - self.shards.position(shards.start) == len(shards)


def listing_digest(item_ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(item_ids).encode()).hexdigest()


def normalisation_stats(stats: ShardStats) -> dict:
    """Mean activation and mean squared norm over the rows that `stats` sums."""
    rows = max(stats.rows, 1)
    return {
        "mean": (np.asarray(stats.sum) / rows).tolist(),
        "mean_squared_norm": stats.sum_squared_norm / rows,
    }


def shard_name(index: int) -> str:
    return f"shards/shard-{index:06d}.safetensors"


def _commit_name(index: int) -> str:
    return f"commits/shard-{index:06d}.json"


def _index_name(k: int) -> str:
    return f"index/range-{k:06d}.json"


def _stats_name(k: int) -> str:
    return f"stats/range-{k:06d}.json"


def _listing(dataset: str, folder: str) -> dict[int, str]:
    """{index: URI} of the commit records or index files in `folder`, by the number in their name;
    a local write's temporary file (`.NAME.*.tmp`) is not one."""
    uris = storage.list_prefix(storage.join(dataset, folder))
    names = {uri: uri.rsplit("/", 1)[1] for uri in uris}
    return {int(name.split("-", 1)[1].split(".", 1)[0]): uri for uri, name in names.items() if name[0] != "."}


def read_manifest(dataset: str) -> Manifest:
    uri = storage.join(dataset, MANIFEST)
    try:
        raw = storage.read_text(uri)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no activation dataset at {dataset!r} (missing {MANIFEST}); run `vlsae extract` first"
        ) from None
    manifest = Manifest.model_validate_json(raw)
    if manifest.format == FORMAT_V1:  # its records are inline
        return manifest
    if manifest.format != FORMAT:
        raise ValueError(
            f"activation dataset {dataset!r} has format {manifest.format!r}, which this version of "
            f"vlsae_ray cannot read (it reads {FORMAT!r} and {FORMAT_V1!r}): upgrade vlsae_ray"
        )
    # commit records first: one deleted after this listing is in an index file listed after it
    commits = _listing(dataset, "commits")
    ranges = list(_listing(dataset, "index"))
    for columns in _read_index(dataset, ranges):
        manifest.shards.add_columns(columns)
    compacted = set(ranges)
    for index, uri in commits.items():
        if index // INDEX_RANGE in compacted:  # left by a compaction that stopped before deleting it
            continue
        try:
            record = ShardRecord.model_validate_json(storage.read_bytes(uri))
        except FileNotFoundError:  # its range was compacted after the listing: read its index file
            k = index // INDEX_RANGE
            manifest.shards.add_columns(_read_index(dataset, [k])[0])
            compacted.add(k)
            for other in manifest._range(k):
                manifest._pending.pop(other, None)
            continue
        manifest.shards.add(record)
        manifest._pending[index] = record.stats
    return manifest


def _read_index(dataset: str, ranges: list[int]) -> list[dict]:
    """The columns of the index files of `ranges`, read concurrently (S3 GETs wait on the network)."""
    uris = [storage.join(dataset, _index_name(k)) for k in ranges]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        # pydantic's JSON parser: twice as fast as the json module's on a million records
        return [from_json(data) for data in pool.map(storage.read_bytes, uris)]


def read_manifest_or_none(dataset: str) -> Manifest | None:
    try:
        return read_manifest(dataset)
    except FileNotFoundError:
        return None


def _write_header(dataset: str, manifest: Manifest) -> None:
    header = manifest.model_dump_json(indent=1, exclude={"shards", "rows"})
    storage.write_text(storage.join(dataset, MANIFEST), header)


def commit(dataset: str, manifest: Manifest, records: list[ShardRecord]) -> Manifest:
    """Commit `records` (by shard index; an index already committed is ignored) and return `manifest`.

    `manifest` is the dataset as read or as returned by the previous commit; it is updated in
    place. Each range that this leaves complete is compacted, and the commit that completes the
    dataset stores its normalisation statistics. A first commit (even of no records) writes the
    header, so an empty job still leaves a dataset.
    """
    if manifest.format != FORMAT:
        raise ValueError(
            f"activation dataset {dataset!r} has the old format {manifest.format!r}: it can be read but "
            "not appended to; extract into a new output"
        )
    for record in records:
        if not 0 <= record.index < manifest.n_shards:
            raise ValueError(
                f"shard index {record.index} is outside this dataset's {manifest.n_shards} shards "
                f"({manifest.items} items, {manifest.shard_rows} per shard)"
            )
        if record.stats is None and record.index not in manifest.shards:
            raise ValueError(
                f"the record of shard {record.index} has no statistics: commit the record that "
                "write_shard returned"
            )
    if not manifest.shards:
        _write_header(dataset, manifest)
    for record in records:
        if record.index in manifest.shards:
            continue
        storage.write_text(storage.join(dataset, _commit_name(record.index)), record.model_dump_json())
        manifest.shards.add(record)
        manifest._pending[record.index] = record.stats
    for k in sorted({index // INDEX_RANGE for index in manifest._pending}):
        if manifest._range_complete(k):
            _compact(dataset, manifest, k)
    if manifest.complete and manifest.stats is None:
        ranges = range(-(-manifest.n_shards // INDEX_RANGE))
        stats = (storage.read_bytes(storage.join(dataset, _stats_name(k))) for k in ranges)
        total = ShardStats.total((ShardStats.model_validate_json(s) for s in stats), manifest.d)
        manifest.stats = normalisation_stats(total)
        _write_header(dataset, manifest)
    return manifest


def _compact(dataset: str, manifest: Manifest, k: int) -> None:
    """Write range k's summed statistics and index file, then delete its commit records."""
    shards = manifest._range(k)
    total = ShardStats.total((manifest._pending[index] for index in shards), manifest.d)
    storage.write_text(storage.join(dataset, _stats_name(k)), total.model_dump_json())
    columns = manifest.shards.columns(
        manifest.shards.position(shards.start), manifest.shards.position(shards.stop)
    )
    storage.write_text(storage.join(dataset, _index_name(k)), json.dumps(columns))
    for index in shards:
        storage.delete(storage.join(dataset, _commit_name(index)))
        del manifest._pending[index]


def write_shard(
    dataset: str,
    index: int,
    activations_nd: torch.Tensor,
    source_ids: list[str],
    token_index: torch.Tensor,
    skipped: dict[str, list[str]] | None = None,
) -> ShardRecord:
    """Write one shard atomically and return its (not yet committed) record, with its statistics."""
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
        skipped=skipped or {},
        stats=ShardStats(rows=len(source_ids), sum=x.sum(0).tolist(), sum_squared_norm=float((x * x).sum())),
    )


def write_dataset(dataset: str, shards_nd: list[torch.Tensor], dtype: str = "float16") -> Manifest:
    """Commit in-memory activations as a dataset, shard i holding `shards_nd[i]` (row r: source id "i/r").

    For tests, benchmarks and notebooks; extraction jobs write their datasets with `run_extract`.
    """
    records = [
        write_shard(
            dataset,
            i,
            x_nd.to(DTYPES[dtype]),
            [f"{i}/{r}" for r in range(x_nd.shape[0])],
            torch.full((x_nd.shape[0],), -1, dtype=torch.int32),
        )
        for i, x_nd in enumerate(shards_nd)
    ]
    shard_rows = max(x_nd.shape[0] for x_nd in shards_nd)
    manifest = Manifest(
        d=shards_nd[0].shape[1],
        dtype=dtype,
        model="in-memory",
        hook_point="in-memory",
        token="cls",
        shard_rows=shard_rows,
        items=shard_rows * (len(shards_nd) - 1) + shards_nd[-1].shape[0],
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
