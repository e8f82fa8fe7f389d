"""SAELens export: the files SAELens reads, and (when sae-lens is installed) SAELens loading them."""

import json

import pytest
import safetensors.torch
import torch

from vlsae_ray.sae import build_sae
from vlsae_ray.sae.saelens import export_saelens

D, F = 8, 32


def trained_like(config):
    """An SAE with a non-trivial input scale and threshold, as after training."""
    torch.manual_seed(0)
    sae = build_sae(config)
    with torch.no_grad():
        sae.init_from_data(5 * torch.randn(256, D) + 2)
        sae.b_enc_f.copy_(0.1 * torch.randn(F))
        if config["architecture"] == "batchtopk":
            sae.threshold.fill_(0.7)
    return sae.eval()


CONFIGS = [
    {"architecture": "topk", "d_in": D, "n_latents": F, "k": 4},
    {"architecture": "batchtopk", "d_in": D, "n_latents": F, "k": 4},
    {"architecture": "jumprelu", "d_in": D, "n_latents": F},
    {"architecture": "relu", "d_in": D, "n_latents": F},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["architecture"])
def test_export_writes_saelens_layout_that_reproduces_our_encodings(tmp_path, config):
    sae = trained_like(config)
    export_saelens(sae, str(tmp_path))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    weights = safetensors.torch.load_file(tmp_path / "sae_weights.safetensors")
    assert cfg["d_in"] == D and cfg["d_sae"] == F and cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["sae_lens_version"] >= "6"
    assert weights["W_enc"].shape == (D, F) and weights["W_dec"].shape == (F, D)
    assert weights["b_enc"].shape == (F,) and weights["b_dec"].shape == (D,)
    # SAELens' encode, written out from its source: relu((x - b_dec) @ W_enc + b_enc) then the
    # architecture's rule; decode: z @ W_dec + b_dec. It must match ours on raw activations.
    x = 5 * torch.randn(64, D) + 2
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    if cfg["architecture"] == "topk":
        keep = pre.topk(cfg["k"], dim=-1).indices
        z = torch.zeros_like(pre).scatter(1, keep, pre.gather(1, keep).relu())
    elif cfg["architecture"] == "jumprelu":
        z = pre.relu() * (pre > weights["threshold"])
    else:
        assert cfg["architecture"] == "standard"
        z = pre.relu()
    with torch.no_grad():
        torch.testing.assert_close(z, sae.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            z @ weights["W_dec"] + weights["b_dec"], sae.decode(sae.encode(x)), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("config", CONFIGS[:3], ids=lambda c: c["architecture"])
def test_saelens_loads_the_export(tmp_path, config):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_like(config)
    export_saelens(sae, str(tmp_path))
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = 5 * torch.randn(64, D) + 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(x), sae(x)[0], rtol=1e-4, atol=1e-4)


def test_vlsae_export_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vl_sae"):
        export_saelens(
            build_sae({"architecture": "vl_sae", "d_in": D, "n_latents": F, "k": 2}), str(tmp_path)
        )
