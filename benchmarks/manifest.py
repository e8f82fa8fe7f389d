"""Does a commit cost the same at a million shards? Commit and read time of the activation manifest,
format 1 (every record inline in one manifest.json, rewritten whole at each commit) against
format 2 (a commit record per shard, compacted into one index file per 1000 shards).

For each size N (10^3 .. 10^6 committed shards), on local disk (a temporary folder), with
simulated shard records of a d=1024 dataset (ViT-L's width; no shard data is written):

- format 2: the dataset's header, index and statistics files of N compacted shards are written
  directly; then `store.commit` commits the next 1000 shards one at a time (one range, so the
  time includes its compaction), and `store.read_manifest` reads the N + 1000 shards back (best
  of 3, as for format 1); then every `ShardRecord` is built from it, what a consumer iterating
  `manifest.shards` pays on top of the read. A commit's time is the median over the 1000 (the
  load of this shared machine comes in bursts) and the mean, which includes the compaction;
- format 1: the code `store.commit` ran before format 2 (`old_commit`, below), on a manifest.json
  of N records, for a few commits; and the read of that file. Format 1 is measured up to
  `--old-max` shards (its manifest is 20 KB a shard at d=1024: 20 GB at 10^6, more than this
  machine's memory) and extrapolated linearly in N beyond (marked "extrapolated"): each of its
  commits rewrites every record, so its cost is proportional to N.

    .venv/bin/python benchmarks/manifest.py [--out benchmarks/results] [--old-max 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from vlsae_ray import storage
from vlsae_ray.activations import store

D, SIZES = 1024, (10**3, 10**4, 10**5, 10**6)
OLD_COMMITS = 5


def sha256(index: int) -> str:
    return hashlib.sha256(index.to_bytes(8, "little")).hexdigest()


def record(index: int) -> store.ShardRecord:
    """A simulated record of a shard of 1024 rows (its statistics included, as write_shard gives them)."""
    return store.ShardRecord(
        index=index,
        name=store.shard_name(index),
        rows=1024,
        sha256=sha256(index),
        stats=store.ShardStats(rows=1024, sum=[0.5 + index % 7] * D, sum_squared_norm=1024.0 * D),
    )


def header(n_shards: int) -> store.Manifest:
    return store.Manifest(
        d=D, dtype="float16", model="sim", hook_point="sim", token="cls", items=n_shards, shard_rows=1
    )


def new_dataset(root: str, n: int) -> store.Manifest:
    """A format-2 dataset of n compacted shards out of n + 2 ranges' worth, written directly."""
    manifest = header(n + 2 * store.INDEX_RANGE)
    storage.write_text(
        storage.join(root, store.MANIFEST), manifest.model_dump_json(exclude={"shards", "rows"})
    )
    stats = store.ShardStats(rows=1024 * store.INDEX_RANGE, sum=[1.0] * D, sum_squared_norm=1.0)
    for k in range(n // store.INDEX_RANGE):
        shards = range(k * store.INDEX_RANGE, (k + 1) * store.INDEX_RANGE)
        columns = {"index": list(shards), "rows": [1024] * len(shards), "sha256": [sha256(i) for i in shards]}
        storage.write_text(storage.join(root, store._stats_name(k)), stats.model_dump_json())
        storage.write_text(storage.join(root, store._index_name(k)), json.dumps(columns | {"skipped": {}}))
    return manifest


class OldRecord(BaseModel):
    index: int
    name: str
    rows: int
    sha256: str
    sum: list[float]
    sum_squared_norm: float
    skipped: dict[str, list[str]] = {}


class OldManifest(BaseModel):
    format: str = store.FORMAT_V1
    d: int
    dtype: str
    model: str
    hook_point: str
    token: str
    source: dict = {}
    shard_rows: int
    items: int
    listing: str = ""
    shards: list[OldRecord] = []
    stats: dict | None = None


def old_record(index: int) -> OldRecord:
    new = record(index)
    return OldRecord(**new.model_dump(exclude={"stats"}), **new.stats.model_dump(exclude={"rows"}))


def old_commit(dataset: str, manifest: OldManifest, records: list[OldRecord]) -> OldManifest:
    """Format 1's commit, as store.commit did it (the dataset never completes here, so no stats)."""
    known = {shard.index for shard in manifest.shards}
    new = [r for r in records if r.index not in known]
    shards = sorted([*manifest.shards, *new], key=lambda shard: shard.index)
    manifest = manifest.model_copy(update={"shards": shards})
    storage.write_text(storage.join(dataset, "manifest.json"), manifest.model_dump_json(indent=1))
    return manifest


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def measure_new(root: str, n: int) -> dict:
    new_dataset(root, n)
    manifest, times = store.read_manifest(root), []
    for i in range(n, n + store.INDEX_RANGE):
        manifest, seconds = timed(store.commit, root, manifest, [record(i)])
        times.append(seconds)
    assert len(manifest.shards) == n + store.INDEX_RANGE and not manifest._pending  # the range compacted
    read = min(timed(store.read_manifest, root)[1] for _ in range(3))
    manifest = store.read_manifest(root)
    records, build = timed(list, manifest.shards)
    assert records[-1] == record(n + store.INDEX_RANGE - 1).model_copy(update={"stats": None})
    return {
        "commit_s": statistics.median(times),
        "commit_mean_s": statistics.mean(times),  # with the range's compaction
        "read_s": read,
        "read_and_build_records_s": read + build,
    }


def measure_old(root: str, n: int) -> dict:
    fields = header(n + 2 * store.INDEX_RANGE).model_dump(
        include=set(OldManifest.model_fields) - {"shards", "format"}
    )
    manifest = OldManifest(**fields, shards=[old_record(i) for i in range(n)])
    storage.write_text(storage.join(root, "manifest.json"), manifest.model_dump_json(indent=1))
    start = time.perf_counter()
    for i in range(n, n + OLD_COMMITS):
        manifest = old_commit(root, manifest, [old_record(i)])
    commit = (time.perf_counter() - start) / OLD_COMMITS
    read = timed(
        lambda: OldManifest.model_validate_json(storage.read_text(storage.join(root, "manifest.json")))
    )[1]
    return {"commit_s": commit, "read_s": read}


def table(rows: list[dict]) -> list[str]:
    base = rows[0]["new"]["commit_s"]
    lines = [
        "| shards | commit, format 1 | commit, format 2: median, mean | format 1 / 2 | format 2 / its 10^3 "
        "| read, format 1 | read, format 2 | + build records | format 1 / 2 (read) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        old, new, mark = row["old"], row["new"], " (extrapolated)" if row["old_extrapolated"] else ""
        lines.append(
            f"| {row['shards']:,} | {old['commit_s'] * 1e3:,.1f} ms{mark} "
            f"| {new['commit_s'] * 1e3:.2f} ms, {new['commit_mean_s'] * 1e3:.2f} ms "
            f"| {old['commit_s'] / new['commit_s']:,.0f} | {new['commit_s'] / base:.2f} "
            f"| {old['read_s']:,.2f} s{mark} | {new['read_s']:.3f} s "
            f"| {new['read_and_build_records_s']:.2f} s | {old['read_s'] / new['read_s']:,.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--old-max", type=int, default=10**4, help="largest N format 1 is measured at")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="numbers of committed shards")
    args = parser.parse_args()
    rows, measured = [], None
    for n in args.sizes:
        root = tempfile.mkdtemp(prefix="vlsae-bench-manifest-")
        try:
            new = measure_new(os.path.join(root, "new"), n)
            extrapolated = n > args.old_max
            if not extrapolated:
                old = measure_old(os.path.join(root, "old"), n)
                measured = (n, old)
            else:  # proportional to N: every commit rewrites, and every read parses, all N records
                old = {key: value * n / measured[0] for key, value in measured[1].items()}
        finally:
            shutil.rmtree(root)
        rows.append(
            {"shards": n, "new": new, "old": old, "old_extrapolated": extrapolated, "load": os.getloadavg()}
        )
        print(json.dumps(rows[-1]), flush=True)
    lines = table(rows)
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({"d": D, "rows": rows}, indent=1))
    (out / "manifest.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
