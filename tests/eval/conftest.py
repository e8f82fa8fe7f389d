"""Helpers for the eval tests: write tensors as a committed activation dataset (the shard protocol)."""

import pytest
import torch

from vlsae_ray import storage
from vlsae_ray.activations import store


def write_dataset(
    uri: str, x_nd: torch.Tensor, ids: list[str], shard_rows: int, hook_point: str = "h"
) -> str:
    """Commit `x_nd` (one row per item, in order) as shards of `shard_rows` items."""
    n = x_nd.shape[0]
    manifest = store.Manifest(
        d=x_nd.shape[1],
        dtype="float32",
        model="test",
        hook_point=hook_point,
        token="cls",
        shard_rows=shard_rows,
        items=n,
        listing=store.listing_digest(ids),
    )
    records = []
    for index, start in enumerate(range(0, n, shard_rows)):
        rows = slice(start, start + shard_rows)
        token_index = torch.zeros(len(ids[rows]), dtype=torch.int32)
        records.append(store.write_shard(uri, index, x_nd[rows].float(), ids[rows], token_index))
    store.commit(uri, manifest, records)
    return uri


@pytest.fixture
def dataset_pair():
    """(activation dataset URI, embedding dataset URI) of the same items, written under `root`."""

    def write(root: str, x_nd: torch.Tensor, e_nd: torch.Tensor, shard_rows: int, ids=None):
        ids = ids or [f"item-{i}" for i in range(x_nd.shape[0])]
        return (
            write_dataset(storage.join(root, "acts"), x_nd, ids, shard_rows),
            write_dataset(storage.join(root, "emb"), e_nd, ids, shard_rows, hook_point="visual"),
        )

    return write
