import json
import uuid
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlsae_ray import storage
from vlsae_ray.activations import store


def manifest(d=4, items=16, shard_rows=8) -> store.Manifest:
    return store.Manifest(
        d=d, dtype="float16", model="m", hook_point="h", token="cls", items=items, shard_rows=shard_rows
    )


def write(dataset, index, rows, d=4, seed=0):
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed)).half()
    ids = [f"item-{index}-{r}" for r in range(rows)]
    return x, ids, store.write_shard(dataset, index, x, ids, torch.arange(rows))


def test_write_commit_read(store_root):
    x0, ids0, r0 = write(store_root, 0, 5, seed=1)
    x1, ids1, r1 = write(store_root, 1, 3, seed=2)
    m = store.commit(store_root, manifest(), [r1])
    assert m.stats is None and not m.complete  # statistics wait for the last shard
    m = store.commit(store_root, m, [r0])
    assert [s.index for s in m.shards] == [0, 1] and m.rows == 8
    x, ids = store.load_activations(store_root)
    assert torch.equal(x, torch.cat([x0, x1]).float()) and ids == ids0 + ids1
    _, _, token_index = store.read_shard(store_root, r0)
    assert token_index.tolist() == list(range(5))
    # stats are the mean and mean squared norm over all rows, stored in the manifest
    stats = json.loads(storage.read_text(storage.join(store_root, "manifest.json")))["stats"]
    full = torch.cat([x0, x1]).double()
    assert stats["mean"] == pytest.approx(full.mean(0).tolist(), rel=1e-6)
    assert stats["mean_squared_norm"] == pytest.approx(float(full.pow(2).sum(-1).mean()), rel=1e-6)


def test_commit_never_duplicates(tmp_path):
    dataset = str(tmp_path)
    _, _, r0 = write(dataset, 0, 5)
    m = store.commit(dataset, manifest(), [r0])
    m = store.commit(dataset, store.read_manifest(dataset), [r0])
    assert m.rows == 5 and len(store.read_manifest(dataset).shards) == 1


def test_uncommitted_shards_are_invisible(tmp_path):
    dataset = str(tmp_path)
    _, _, r0 = write(dataset, 0, 5)
    store.commit(dataset, manifest(), [r0])
    write(dataset, 1, 7)  # written, never committed (a job killed here)
    x, _ = store.load_activations(dataset)
    assert x.shape[0] == 5


def test_corrupt_shard_is_detected(tmp_path):
    dataset = str(tmp_path)
    _, _, r0 = write(dataset, 0, 5)
    store.commit(dataset, manifest(), [r0])
    path = tmp_path / r0.name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its manifest checksum"):
        store.load_activations(dataset)


def test_missing_dataset_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `vlsae extract` first"):
        store.read_manifest(str(tmp_path / "none"))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    d=st.integers(1, 5),
    dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
)
def test_round_trip_any_shape_and_dtype(tmp_path_factory, rows, d, dtype):
    dataset = str(tmp_path_factory.mktemp("prop"))
    expected, records = [], []
    for index, n in enumerate(rows):
        x = torch.randn(n, d).to(store.DTYPES[dtype])
        ids = [f"{index}/{r}" for r in range(n)]
        records.append(store.write_shard(dataset, index, x, ids, torch.zeros(n)))
        expected.append(x)
    empty = store.Manifest(
        d=d, dtype=dtype, model="m", hook_point="h", token="cls", items=len(rows) * 6, shard_rows=6
    )
    store.commit(dataset, empty, records[::-1])
    x, ids = store.load_activations(dataset, dtype=store.DTYPES[dtype])
    assert torch.equal(x, torch.cat(expected))
    assert ids == [f"{i}/{r}" for i, n in enumerate(rows) for r in range(n)]


def test_a_shard_of_only_skipped_items_is_written_and_committed(tmp_path):
    dataset = str(tmp_path)
    skipped = {"bad_image": ["a", "b"]}
    record = store.write_shard(dataset, 0, torch.empty(0, 4).half(), [], torch.empty(0), skipped)
    m = store.commit(dataset, manifest(items=2, shard_rows=2), [record])
    assert m.complete and m.rows == 0 and store.read_manifest(dataset).shards[0].skipped == skipped
    x, ids, tokens = store.read_shard(dataset, record)
    assert x.shape == (0, 4) and ids == [] and tokens.shape == (0,)


def test_commit_refuses_a_shard_outside_the_dataset(tmp_path):
    _, _, record = write(str(tmp_path), 2, 3)
    with pytest.raises(ValueError, match="shard index 2 is outside this dataset's 2 shards"):
        store.commit(str(tmp_path), manifest(items=16, shard_rows=8), [record])


def test_same_content_gives_the_same_bytes(tmp_path):
    # a rerun must reproduce a shard's checksum: the safetensors header has a fixed order
    assert len({write(str(tmp_path / str(i)), 0, 5)[2].sha256 for i in range(10)}) == 1


class Crash(Exception):
    """A writer killed before one of its storage operations (injected: a real kill cannot be timed)."""


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), n_shards=st.integers(1, 8), index_range=st.integers(1, 4))
def test_every_committed_shard_is_read_once_whatever_the_order_and_crashes(
    store_root, data, n_shards, index_range
):
    """Commits in any order and batches, by writers killed before any storage operation (during a
    commit, a compaction or the final statistics) and restarted from what they read back: a reader
    sees exactly the shards whose commit record was written, and the end state is the whole dataset."""
    dataset = storage.join(store_root, uuid.uuid4().hex[:8])
    with mock.patch.object(store, "INDEX_RANGE", index_range):  # several ranges on a few shards
        shards = [write(dataset, i, rows=(i + 2) % 3, seed=i) for i in range(n_shards)]  # some have no rows
        order = data.draw(st.permutations(range(n_shards)))
        operations = data.draw(st.lists(st.integers(0, 30), max_size=3))  # crash before these operations
        committed, calls = set(), [0]
        write_bytes, delete = storage.write_bytes, storage.delete

        def crashing(operation):
            def run(uri, *args):
                calls[0] += 1
                if calls[0] in operations:
                    raise Crash(uri)
                operation(uri, *args)
                if "/commits/" in uri and args:
                    committed.add(int(uri.rsplit("-", 1)[1].split(".")[0]))

            return run

        with (
            mock.patch.object(storage, "write_bytes", crashing(write_bytes)),
            mock.patch.object(storage, "delete", crashing(delete)),
        ):
            m = manifest(items=n_shards * 2, shard_rows=2)
            while True:
                todo = [i for i in order if i not in m.shards]
                batch = data.draw(st.integers(1, max(1, len(todo))))
                try:
                    for start in range(0, max(1, len(todo)), batch):
                        m = store.commit(dataset, m, [shards[i][2] for i in todo[start : start + batch]])
                    break
                except Crash:
                    # the restarted writer (a crash before the first header leaves no dataset)
                    m = store.read_manifest_or_none(dataset) or manifest(items=n_shards * 2, shard_rows=2)
                    assert list(m.shards.indices) == sorted(committed)
    m = store.read_manifest(dataset)
    assert m.complete and [s.index for s in m.shards] == list(range(n_shards))
    assert [s.rows for s in m.shards] == [x.shape[0] for x, _, _ in shards]
    x_nd, ids = store.load_activations(dataset)
    assert torch.equal(x_nd, torch.cat([x for x, _, _ in shards]).float())
    assert ids == [i for _, shard_ids, _ in shards for i in shard_ids]
    full = x_nd.double()
    assert m.stats["mean"] == pytest.approx(full.mean(0).tolist(), rel=1e-9, abs=1e-12)
    assert m.stats["mean_squared_norm"] == pytest.approx(float(full.pow(2).sum(-1).mean()), rel=1e-9)


def test_a_reader_racing_a_compaction_sees_every_shard_once(tmp_path):
    """A compaction that deletes commit records after the reader listed them: the reader finds them
    in the range's index file."""
    dataset = str(tmp_path)
    records = [write(dataset, i, 2, seed=i)[2] for i in range(3)]
    m = store.commit(dataset, manifest(items=6, shard_rows=2), records[:2])
    list_prefix = storage.list_prefix

    def listing_then_compaction(prefix):
        listed = list_prefix(prefix)
        if prefix.endswith("/index"):  # the last listing before the reader's GETs
            store.commit(dataset, m, records[2:])  # completes, compacts, deletes commit records 0 and 1
            assert not list_prefix(storage.join(dataset, "commits"))
        return listed

    with mock.patch.object(storage, "list_prefix", listing_then_compaction):
        racing = store.read_manifest(dataset)
    assert [s.index for s in racing.shards] == [0, 1, 2] and racing.rows == 6
    again = store.read_manifest(dataset).shards
    assert racing.shards == again


def test_commit_cost_is_one_record_and_readers_load_index_files(tmp_path):
    """A commit writes one small record; a complete range becomes one index file, its records gone."""
    dataset = str(tmp_path)
    records = [write(dataset, i, 1, seed=i)[2] for i in range(5)]
    with mock.patch.object(store, "INDEX_RANGE", 2):
        m = store.commit(dataset, manifest(items=5, shard_rows=1), records[:1])
        m = store.commit(dataset, m, records[3:4])
        names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
        assert names == ["commits/shard-000000.json", "commits/shard-000003.json", "manifest.json"]
        header = json.loads((tmp_path / "manifest.json").read_text())
        assert "shards" not in header and header["format"] == store.FORMAT and header["stats"] is None
        m = store.commit(dataset, m, records[1:3])  # completes ranges 0 and 1
        assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
            "range-000000.json",
            "range-000001.json",
        ]
        assert [p.name for p in (tmp_path / "commits").iterdir()] == []
        index = json.loads((tmp_path / "index" / "range-000001.json").read_text())
        assert index["index"] == [2, 3] and index["sha256"] == [records[2].sha256, records[3].sha256]
        m = store.commit(dataset, m, records[4:])
        assert m.complete and store.read_manifest(dataset) == m


def test_an_old_format_dataset_is_read_but_not_appended_to(store_root):
    """A format-1 dataset (every record, with its sums, inline in manifest.json) as that code wrote it."""
    x0, ids0, r0 = write(store_root, 0, 5, seed=1)
    x1, ids1, r1 = write(store_root, 1, 3, seed=2)
    old = manifest().model_dump(exclude={"shards", "rows"}) | {"format": "vlsae-activations/1"}
    old["shards"] = [
        r.model_dump(exclude={"stats"}) | {"sum": r.stats.sum, "sum_squared_norm": r.stats.sum_squared_norm}
        for r in (r0, r1)
    ]
    storage.write_text(storage.join(store_root, "manifest.json"), json.dumps(old))
    m = store.read_manifest(store_root)
    assert [(s.index, s.rows, s.sha256) for s in m.shards] == [(0, 5, r0.sha256), (1, 3, r1.sha256)]
    assert m.complete and m.rows == 8
    x, ids = store.load_activations(store_root)
    assert torch.equal(x, torch.cat([x0, x1]).float()) and ids == ids0 + ids1
    with pytest.raises(ValueError, match="old format 'vlsae-activations/1'.*extract into a new output"):
        store.commit(store_root, m, [])


def test_an_unknown_format_says_to_upgrade(tmp_path):
    storage.write_text(
        str(tmp_path / "manifest.json"),
        manifest().model_dump_json(exclude={"shards"}).replace(store.FORMAT, "vlsae-activations/9"),
    )
    with pytest.raises(ValueError, match="format 'vlsae-activations/9'.*upgrade vlsae_ray"):
        store.read_manifest(str(tmp_path))
