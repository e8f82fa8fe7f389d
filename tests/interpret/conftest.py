"""Shared by the interpretation tests: an SAE trained on the concept world, and datasets written
shard by shard through the store (as extraction writes them)."""

import pytest
import torch

from vlsae_ray.activations import store
from vlsae_ray.backbones import Backbone, builtin_backbone
from vlsae_ray.sae import build_sae
from vlsae_ray.train import fit_local
from vlsae_ray.world import generate_items

N = 2048
WORLD_SOURCE = {"kind": "world", "n_items": N, "seed": 1}
BLOCK, EMBEDDING = "visual.transformer.resblocks.2", "visual"


@pytest.fixture(scope="session")
def write_dataset():
    return _write_dataset


def _write_dataset(
    uri: str, x_nd: torch.Tensor, ids: list[str], shard_sizes: list[int], source: dict | None = None
) -> str:
    """An activation dataset at `uri` whose shards hold `shard_sizes` rows (fewer than `shard_rows`
    items where items were skipped)."""
    manifest = store.Manifest(
        d=x_nd.shape[1],
        dtype="float32",
        model="world-clip",
        hook_point="test",
        token="cls",
        source=source or {},
        shard_rows=max(shard_sizes),
        items=max(shard_sizes) * len(shard_sizes),
    )
    start, records = 0, []
    for index, rows in enumerate(shard_sizes):
        part = slice(start, start + rows)
        records.append(store.write_shard(uri, index, x_nd[part], ids[part], torch.zeros(rows)))
        start += rows
    store.commit(uri, manifest, records)
    return uri


@pytest.fixture(scope="session")
def world_sae():
    """(item ids, block-2 CLS activations, SAE latents, image embeddings, the SAE) on N world items."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        items = generate_items(N, seed=1)
        backbone = Backbone(builtin_backbone())
        with torch.no_grad():
            pixels = torch.stack([backbone.preprocess(item.image) for item in items])
            acts = backbone.activations([BLOCK, EMBEDDING], pixels=pixels, item_ids=[i.id for i in items])
        x_nd, embeddings_ne = acts[BLOCK].values, acts[EMBEDDING].values
        # the demo's recipe (demo.py): few dead latents on 2048 items
        sae = build_sae(
            {"architecture": "topk", "d_in": x_nd.shape[1], "n_latents": 8 * x_nd.shape[1], "k": 40}
        )
        fit_local(sae, x_nd, batch_size=256, epochs=10, seed=0, lr=8e-4)
        with torch.no_grad():
            z_nf = sae.encode(x_nd)
    finally:
        torch.set_num_threads(threads)
    return [item.id for item in items], x_nd, z_nf, embeddings_ne, sae
