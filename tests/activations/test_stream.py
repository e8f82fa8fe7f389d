"""The training stream (a Ray Data dataset per part, on a real local Ray): parts split each epoch
without overlap, and a resumed stream repeats nothing."""

import torch

from vlsae_ray.activations import store
from vlsae_ray.activations.reader import ActivationStream

SHARD_ROWS = [40, 40, 40, 40, 40, 40, 40, 23]  # uneven last shard


def numbered_dataset(root):
    """Row r of the dataset has x[:, 0] = r, so each batch row names the dataset row it came from."""
    x = torch.zeros(sum(SHARD_ROWS), 4)
    x[:, 0] = torch.arange(len(x))
    store.write_dataset(root, list(x.split(SHARD_ROWS)), dtype="float32")
    return len(x)


def rows_of(batches):
    return [int(r) for batch in batches for r in batch[:, 0]]


def test_parts_split_each_epoch_without_overlap_or_repeats(tmp_path, ray_cluster):
    total = numbered_dataset(str(tmp_path))
    for epoch in range(2):
        streams = [
            ActivationStream(str(tmp_path), batch_size=32, seed=7, window_shards=2, part=p, parts=2)
            for p in range(2)
        ]
        steps = streams[0].steps_in_epoch(epoch)
        parts = [rows_of(stream.epoch(epoch)) for stream in streams]
        assert all(len(rows) == steps * 16 for rows in parts)
        seen = parts[0] + parts[1]
        assert len(set(seen)) == len(seen)  # no row twice in an epoch, within or across parts
        # left out: at most each part's partial last batch plus the longer part's surplus windows
        assert total - len(seen) < 2 * 16 + 2 * max(SHARD_ROWS)
        # each part reads whole windows of its own: no shard feeds both parts
        shards = [{r // 40 for r in rows} for rows in parts]
        assert not shards[0] & shards[1]
    orders = [rows_of(ActivationStream(str(tmp_path), batch_size=32, seed=s).epoch(0)) for s in (7, 7, 8)]
    assert orders[0] == orders[1] != orders[2]


def test_windows_read_in_parallel_arrive_in_order(tmp_path, ray_cluster):
    """One big shard among small ones is read slowest; with 4 reads at a time its window must
    still come in its place (Ray Data hands out blocks as they finish unless told to keep order)."""
    x = torch.zeros(300_000 + 7 * 40, 4)
    x[:, 0] = torch.arange(len(x))
    store.write_dataset(str(tmp_path), list(x.split([300_000] + [40] * 7)), dtype="float32")
    streams = [
        ActivationStream(str(tmp_path), batch_size=40, seed=1, window_shards=1, read_tasks=r) for r in (4, 1)
    ]
    parallel, serial = (rows_of(stream.epoch(0)) for stream in streams)
    assert parallel == serial


def test_resumed_stream_continues_with_the_same_batches(tmp_path, ray_cluster):
    numbered_dataset(str(tmp_path))
    stream = ActivationStream(str(tmp_path), batch_size=24, seed=3, window_shards=3)
    full = rows_of(stream.epoch(1))
    assert len(full) == stream.steps_in_epoch(1) * 24 == 303 // 24 * 24
    for start in (0, 1, 5, stream.steps_in_epoch(1) - 1):
        assert rows_of(stream.epoch(1, start_step=start)) == full[start * 24 :]


def test_vl_stream_keeps_pairs_and_resumes_and_unpaired_sides_stream_alone(tmp_path, ray_cluster):
    """A VL-SAE's batch is a part's image rows, then the same items' text rows."""
    n = numbered_dataset(str(tmp_path / "images"))
    x = torch.zeros(n, 4)
    x[:, 0] = -torch.arange(n)  # text row r of the pair = -(image row r)
    store.write_dataset(str(tmp_path / "texts"), list(x.split(SHARD_ROWS)), dtype="float32")
    images, texts = str(tmp_path / "images"), str(tmp_path / "texts")
    options = {"batch_size": 32, "seed": 3, "window_shards": 2, "parts": 2, "part": 1}
    stream = ActivationStream(images, text_dataset=texts, **options)
    alone = ActivationStream(images, **options)  # the image side on its own
    assert torch.equal(stream.modality_b, torch.arange(32) >= 16)
    batches = list(stream.epoch(1))
    assert len(batches) == stream.steps_in_epoch(1) == alone.steps_in_epoch(1) > 0
    assert rows_of(b[:16] for b in batches) == rows_of(alone.epoch(1))
    assert all(torch.equal(b[16:], -b[:16]) for b in batches)  # text row i pairs with image row i
    resumed = list(stream.epoch(1, start_step=2))
    assert all(torch.equal(a, b) for a, b in zip(resumed, batches[2:], strict=True))
    sample_nd, modality_n = stream.init_sample(100)
    assert sample_nd.shape == (200, 4) and torch.equal(modality_n, torch.arange(200) >= 100)
    assert torch.equal(sample_nd[100:], -sample_nd[:100])  # the same items on both sides

    # Unpaired: a shorter text side is a stream of its own, and an epoch is the shorter side's.
    short = str(tmp_path / "short")
    store.write_dataset(short, [torch.randn(40, 4), torch.randn(40, 4)], dtype="float32")
    stream = ActivationStream(images, text_dataset=short, batch_size=32, seed=3)
    text_alone = ActivationStream(short, batch_size=32, seed=3)
    assert stream.steps_in_epoch(0) == text_alone.steps_in_epoch(0) == 80 // 32
    assert all(torch.equal(b[32:], t) for b, t in zip(stream.epoch(0), text_alone.epoch(0), strict=True))
