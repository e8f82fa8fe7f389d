import json

import pytest
import torch
from hypothesis import given, settings
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
