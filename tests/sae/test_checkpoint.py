import json

import pytest
import safetensors.torch
import torch

from vlsae_ray import storage
from vlsae_ray.sae import ReLUSAE, SparseAutoencoder, TopKSAE, build_sae, checkpoint
from vlsae_ray.sae.base import load_config, load_sae
from vlsae_ray.train import fit_local
from vlsae_ray.train.parallel import LatentShardedSAE, ParallelLayout

TOPK = {"architecture": "topk", "d_in": 12, "n_latents": 48, "k": 3}
RELU = {"architecture": "relu", "d_in": 12, "n_latents": 48, "l1_coefficient": 0.05}


def assert_same_outputs(a, b, x):
    with torch.no_grad():
        out_a, out_b = a.eval()(x), b.eval()(x)
        assert torch.equal(out_a[0], out_b[0])
        assert torch.equal(out_a[1], out_b[1])
        assert torch.equal(a.encode(x), b.encode(x))


@pytest.mark.parametrize(("config", "cls"), [(TOPK, TopKSAE), (RELU, ReLUSAE)])
def test_round_trip_after_training_folds_the_input_scale(tmp_path, config, cls):
    torch.manual_seed(0)
    activations = 20.0 * torch.randn(512, 12) + 5.0  # raw units far from scale 1
    sae = build_sae(config)
    fit_local(sae, activations, batch_size=64, epochs=2, seed=0)
    assert float(sae.input_scale) > 10

    sae.save(str(tmp_path / "ckpt"))
    loaded = SparseAutoencoder.load(str(tmp_path / "ckpt"))

    assert type(loaded) is cls
    assert loaded.config == sae.config
    assert float(loaded.input_scale) == 1.0
    torch.testing.assert_close(loaded.W_dec_fd.norm(dim=-1), torch.ones(48))
    assert_same_outputs(sae, loaded, activations[:100])
    assert (
        json.loads((tmp_path / "ckpt" / "config.json").read_text())["architecture"] == config["architecture"]
    )


def test_subclass_load_checks_the_architecture(tmp_path):
    build_sae(RELU).save(str(tmp_path))
    assert isinstance(ReLUSAE.load(str(tmp_path)), ReLUSAE)
    with pytest.raises(TypeError, match="ReLUSAE"):
        TopKSAE.load(str(tmp_path))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAE checkpoint"):
        SparseAutoencoder.load(str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    "config",
    [
        {"architecture": "batchtopk", "d_in": 12, "n_latents": 48, "k": 3},
        {"architecture": "matryoshka_batchtopk", "d_in": 12, "n_latents": 48, "k": 3},
        {"architecture": "jumprelu", "d_in": 12, "n_latents": 48},
        {"architecture": "vl_sae", "d_in": 12, "n_latents": 48, "k": 3},
    ],
    ids=lambda c: c["architecture"],
)
def test_every_architecture_round_trips_on_raw_activations(tmp_path, config):
    torch.manual_seed(0)
    activations = 20.0 * torch.randn(512, 12) + 5.0
    modality = torch.arange(512) % 2 == 1 if config["architecture"] == "vl_sae" else None
    sae = build_sae(config)
    fit_local(sae, activations, batch_size=64, epochs=2, seed=0, modality=modality)
    sae.save(str(tmp_path / "ckpt"))
    loaded = SparseAutoencoder.load(str(tmp_path / "ckpt"))
    assert type(loaded) is type(sae) and float(loaded.input_scale) == 1.0
    x = activations[:100]
    with torch.no_grad():
        out, out_loaded = sae.eval()(x), loaded.eval()(x)
        torch.testing.assert_close(out_loaded[0], out[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out_loaded[1], out[1], rtol=1e-5, atol=1e-4)
        assert (out[1] != 0).any()


def test_the_streamed_file_is_safetensors_that_the_library_reads(tmp_path):
    """The writer is our own (it streams tensors); the reference reader is the safetensors library."""
    torch.manual_seed(0)
    sae = build_sae({"architecture": "batchtopk", "d_in": 12, "n_latents": 48, "k": 3})
    sae.input_scale.fill_(3.0)
    sae.save(str(tmp_path))
    on_disk = safetensors.torch.load_file(tmp_path / "sae.safetensors")
    folded = sae.folded_state_dict()
    assert on_disk.keys() == folded.keys()
    assert all(torch.equal(on_disk[name], tensor) for name, tensor in folded.items())


def save_two_shards(sae, uri):
    """A 2-shard sharded checkpoint of `sae`, written shard by shard as `LatentShardedSAE.save` does."""
    records = []
    for s in range(2):
        shard = LatentShardedSAE.shard_of(sae, ParallelLayout(1, 2, 0, s))
        rows = (shard.offset, shard.offset + shard.n_local)
        records.append(checkpoint.write_shard(uri, s, 2, rows, shard.local.folded_state_dict()))
    checkpoint.commit_sharded(uri, sae.config.model_dump_json(), records)


def test_sharded_checkpoint_loads_as_the_single_file_and_reads_in_part(store_root):
    torch.manual_seed(0)
    sae = build_sae(TOPK)
    fit_local(sae, 20.0 * torch.randn(256, 12) + 5.0, batch_size=64, epochs=1, seed=0)
    single, sharded = storage.join(store_root, "single"), storage.join(store_root, "sharded")
    sae.save(single)
    save_two_shards(sae, sharded)
    expected = SparseAutoencoder.load(single).state_dict()
    loaded = SparseAutoencoder.load(sharded)
    assert type(loaded) is TopKSAE and load_config(sharded) == sae.config
    assert all(torch.equal(loaded.state_dict()[name], t) for name, t in expected.items())
    for uri in (single, sharded):  # rows 20..30 cross the shards' boundary at 24
        _, part = checkpoint.read(uri, latents=slice(20, 30))
        for name, tensor in expected.items():
            assert torch.equal(part[name], tensor[20:30] if checkpoint.latent_tensor(name) else tensor)
    with pytest.raises(ValueError, match=r"latents=slice\(30, 20, None\) selects no contiguous latents"):
        checkpoint.read(sharded, latents=slice(30, 20))
    with pytest.raises(TypeError, match="ReLUSAE"):
        ReLUSAE.load(sharded)


def test_load_sae_reloads_when_a_sharded_save_commits(store_root):
    uri = storage.join(store_root, "sae")
    torch.manual_seed(0)
    first, second = build_sae(TOPK), build_sae(TOPK)
    save_two_shards(first, uri)
    assert torch.equal(load_sae(uri).W_enc_fd, first.W_enc_fd)
    assert load_sae(uri) is load_sae(uri)  # cached while the index is unchanged
    save_two_shards(second, uri)
    assert torch.equal(load_sae(uri).W_enc_fd, second.W_enc_fd)
    # the first save's shard files are deleted once the second one commits
    named = [
        s["file"] for s in json.loads(storage.read_text(storage.join(uri, checkpoint.INDEX_FILE)))["shards"]
    ]
    listed = {u.rsplit("/", 1)[1] for u in storage.list_prefix(uri)}
    assert listed == {"config.json", checkpoint.INDEX_FILE, *named}


def test_an_index_of_another_format_is_refused_with_the_fix(tmp_path):
    save_two_shards(build_sae(TOPK), str(tmp_path))
    index = json.loads((tmp_path / checkpoint.INDEX_FILE).read_text())
    (tmp_path / checkpoint.INDEX_FILE).write_text(json.dumps({**index, "format": 99}))
    with pytest.raises(ValueError, match="has format 99; this version reads format 1"):
        SparseAutoencoder.load(str(tmp_path))
