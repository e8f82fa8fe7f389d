"""Shared fixtures: a real SeaweedFS S3 server and a real local Ray, both on loopback; an SAE
trained on the concept world, and datasets written shard by shard through the store (as
extraction writes them), and VL-SAEs fitted on world image and caption embeddings.

`store_root` runs a test once on a local folder and once on an `s3://` bucket of the server.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
import torch

import vlsae_ray  # noqa: F401  (torchvision guard, offline switches)
from vlsae_ray.activations import store
from vlsae_ray.backbones import Backbone, builtin_backbone
from vlsae_ray.local_stack import SeaweedFS, connect_ray, free_port
from vlsae_ray.sae import build_sae
from vlsae_ray.train import fit_local
from vlsae_ray.world import generate_items, load_world_clip

TEST_BUCKET = "vlsae-test"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is as fast, and far faster when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    saved = {
        key: os.environ.get(key) for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    server = SeaweedFS(str(tmp_path_factory.mktemp("seaweedfs")), buckets=(TEST_BUCKET,)).start()
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_root(s3_server) -> str:
    """A fresh prefix in the test bucket."""
    return f"s3://{TEST_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_root")


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> str:
    """A local Ray on loopback; yields its job API address. Started after the S3 server so workers
    inherit its endpoint."""
    import ray

    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    # A Ray Data execution holds its share of the cluster through requests that expire after 180 s
    # unless renewed (every 10 s). A driver the tests kill never cancels its own, so for 3 minutes the
    # next execution got 1 of the 2 CPUs: its model actor held that one and no shard was written
    # (seen in CI: the killed-actor test waited 175 s). Drivers started from here expire theirs sooner.
    os.environ["RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S"] = "30"
    # the cluster's `python` is the one with this project installed, as on a user's cluster image
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    port = free_port()
    connect_ray(num_cpus=2, dashboard_port=port)
    yield f"http://127.0.0.1:{port}"
    ray.shutdown()


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
def world_vl_sae():
    return _world_vl_sae


def _world_vl_sae(n_items: int, seed: int, n_latents: int, k: int, batch_size: int):
    """(image embeddings, caption embeddings, a VL-SAE fitted on both for 3 epochs) of `n_items`
    world training items of `seed`, embedded by the world CLIP."""
    model, preprocess, tokenizer = load_world_clip()
    items = generate_items(n_items, seed=seed)
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(item.image) for item in items]))
        texts = model.encode_text(tokenizer([item.caption for item in items]))
    torch.manual_seed(0)
    sae = build_sae({"architecture": "vl_sae", "d_in": images.shape[1], "n_latents": n_latents, "k": k})
    modality = torch.arange(2 * n_items) >= n_items
    fit_local(sae, torch.cat([images, texts]), batch_size=batch_size, epochs=3, seed=0, modality=modality)
    return images, texts, sae.eval()


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
