"""A 4-shard latent-sharded run saves one file per shard, with no gather, and loads back whole.

Each rank runs tests/train/save_worker.py in its own process on real gloo process groups; the
reference is the SAE gathered from the shards (`full_sae`) with its input scale folded, as the
single-file save writes it. On S3 the part size is S3's smallest, so every shard file goes up in parts.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlsae_ray import storage
from vlsae_ray.sae import SparseAutoencoder, checkpoint
from vlsae_ray.train.plan import save_plan

WORKER = Path(__file__).with_name("save_worker.py")
WORLD = 4
# A shard of 16384 latents x 512: W_enc and W_dec 32 MiB each, 13 parts of 5 MiB.
SAE = {"architecture": "batchtopk", "d_in": 512, "n_latents": WORLD * 16384, "k": 8}
KILLED_SAVE_EXIT = 3


@pytest.mark.parametrize("where", ["local", "s3"])
def test_four_shard_save_holds_no_gathered_copy_loads_whole_and_survives_a_killed_save(
    tmp_path, request, where
):
    root = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3_root")
    uri, single_uri = storage.join(root, "sae"), storage.join(root, "single")
    out = tmp_path / "out"
    out.mkdir()
    spec = {"sae": SAE, "uri": uri, "single_uri": single_uri}
    env = {
        **os.environ,
        storage.PART_SIZE_ENV: str(storage.MIN_PART_SIZE),
        # Buffers over 1 MiB are mapped and unmapped by themselves (glibc would otherwise raise the
        # threshold and keep freed parts resident), so the peak RSS is the memory the save holds.
        "MALLOC_MMAP_THRESHOLD_": str(2**20),
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(WORLD),
                str(rank),
                str(tmp_path / "pg"),
                str(out),
                json.dumps(spec),
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(WORLD)
    ]
    for rank, proc in enumerate(procs):
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == (KILLED_SAVE_EXIT if rank == 0 else 0), stderr[-3000:]

    # Memory: each rank's save adds at most what `vlsae plan` counts (three parts), far less than
    # its shard; the gather it replaces adds the whole SAE (the measurement sees a copy if there is one).
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    shard_bytes = results[0]["shard_bytes"]
    planned = save_plan(SAE["d_in"], SAE["n_latents"], WORLD, storage.MIN_PART_SIZE)
    assert planned.extra_memory < shard_bytes / 4
    for result in results:
        assert result["save_extra"] <= planned.extra_memory, results
    assert results[0]["gather_extra"] >= WORLD * shard_bytes * 0.9, results

    # The killed save's shards were written, but the index still names the first save's files.
    reference = torch.load(out / "reference.pt")
    loaded = SparseAutoencoder.load(uri)
    assert loaded.state_dict().keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    single = SparseAutoencoder.load(single_uri)
    assert all(torch.equal(single.state_dict()[name], t) for name, t in reference.items())

    index = json.loads(storage.read_text(storage.join(uri, checkpoint.INDEX_FILE)))
    assert index["latent_shards"] == WORLD and index["n_latents"] == SAE["n_latents"]
    shard_files = {
        u for u in storage.list_prefix(uri) if checkpoint.SHARD_FILE.fullmatch(u.rsplit("/", 1)[1])
    }
    assert len(shard_files) == 2 * WORLD  # the killed save's four, not named by the index
    for s, record in enumerate(index["shards"]):
        data = storage.read_bytes(storage.join(uri, record["file"]))
        assert record["latents"] == [s * 16384, (s + 1) * 16384]
        assert len(data) == record["bytes"] and hashlib.sha256(data).hexdigest() == record["sha256"]
        # the plan's figure is shard 0's parameters; it adds the header and three scalars
        assert (
            0 <= record["bytes"] - planned.bytes_per_rank < 1024
            if s == 0
            else record["bytes"] < planned.bytes_per_rank
        )
        if where == "s3":  # a multipart upload's ETag counts its parts
            assert storage.version(storage.join(uri, record["file"])).endswith(f"-{planned.parts_per_file}")

    # Part of the SAE without the rest: rows across the boundary of shards 0 and 1.
    config, part = checkpoint.read(uri, latents=slice(16384 - 3, 16384 + 5))
    assert config == json.loads(storage.read_text(storage.join(uri, checkpoint.CONFIG_FILE)))
    for name, tensor in reference.items():
        expected = tensor[16384 - 3 : 16384 + 5] if checkpoint.latent_tensor(name) else tensor
        assert torch.equal(part[name], expected), name

    # A single-file save over the sharded one replaces it and removes its files, stray ones too.
    loaded.save(uri)
    assert not storage.exists(storage.join(uri, checkpoint.INDEX_FILE))
    assert sorted(u.rsplit("/", 1)[1] for u in storage.list_prefix(uri)) == ["config.json", "sae.safetensors"]
    assert all(torch.equal(SparseAutoencoder.load(uri).state_dict()[n], t) for n, t in reference.items())
