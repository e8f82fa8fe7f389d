import json

import pytest
import torch

from vlsae_ray.sae import ReLUSAE, SparseAutoencoder, TopKSAE, build_sae
from vlsae_ray.train import fit_local

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
