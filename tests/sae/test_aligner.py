"""The LLaVA aligner: its loss against a hand-written InfoNCE plus MSE, save and load, bad configs."""

import math

import pytest
import torch

from vlsae_ray.config import ConfigError, TrainConfig, parse_config
from vlsae_ray.sae.aligner import Aligner, AlignerConfig


def hand_written_loss(aligner: Aligner, v_bd, t_bd, temperature: float) -> float:
    """InfoNCE both ways, row by row with plain sums, plus each side's reconstruction MSE."""
    p_v = v_bd @ aligner.vision_projection.weight.T + aligner.vision_projection.bias
    p_t = t_bd @ aligner.text_projection.weight.T + aligner.text_projection.bias
    B = len(v_bd)
    sim = [[float(p_v[i] @ p_t[j]) / temperature for j in range(B)] for i in range(B)]
    image_to_text = -sum(sim[i][i] - math.log(sum(math.exp(s) for s in sim[i])) for i in range(B)) / B
    column = [[sim[i][j] for i in range(B)] for j in range(B)]
    text_to_image = -sum(sim[j][j] - math.log(sum(math.exp(s) for s in column[j])) for j in range(B)) / B
    v_rec = p_v @ aligner.vision_decoder.weight.T + aligner.vision_decoder.bias
    t_rec = p_t @ aligner.text_decoder.weight.T + aligner.text_decoder.bias
    mse = float(((v_rec - v_bd) ** 2).mean() + ((t_rec - t_bd) ** 2).mean())
    return (image_to_text + text_to_image) / 2 + mse


@torch.no_grad()
def test_loss_is_symmetric_info_nce_plus_both_mses():
    torch.manual_seed(0)
    aligner = Aligner(AlignerConfig(d_in=12, d_proj=8, temperature=0.07))
    v_bd, t_bd = torch.randn(6, 12), torch.randn(6, 12)
    terms = aligner(v_bd, t_bd)
    expected = hand_written_loss(aligner, v_bd, t_bd, 0.07)
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(
        float(terms["info_nce"] + terms["mse_vision"] + terms["mse_text"]), rel=1e-6
    )
    # not symmetric in its arguments when the projections differ: each side has its own maps
    assert float(aligner(t_bd, v_bd)["loss"]) != pytest.approx(expected, rel=1e-3)


def test_save_and_load_give_the_same_maps(tmp_path):
    torch.manual_seed(1)
    aligner = Aligner(AlignerConfig(d_in=10, d_proj=6))
    aligner.save(str(tmp_path / "aligner"))
    loaded = Aligner.load(str(tmp_path / "aligner"))
    x = torch.randn(3, 10)
    assert loaded.config == aligner.config
    for modality in ("vision", "text"):
        p = aligner.project(x, modality)
        assert torch.equal(loaded.project(x, modality), p)
        assert torch.equal(loaded.decode(p, modality), aligner.decode(p, modality))


def test_bad_aligner_configs_are_refused():
    base = {
        "activations": "images",
        "text_activations": "texts",
        "sae": {"architecture": "vl_sae", "d_in": 8, "n_latents": 32, "k": 4},
        "aligner": {"d_proj": 8},
        "output": "out",
    }
    assert parse_config(base, TrainConfig).aligner.lr == 5e-5  # the authors' defaults
    refusals = [
        ({"text_activations": None}, "aligner needs paired image and text datasets"),
        ({"paired": False}, "aligner needs paired image and text datasets"),
        ({"aligner": {"d_proj": 16}}, "sae has d_in=8, but the aligner projects to d_proj=16"),
        ({"aligner": {"temperature": 0}}, "aligner.temperature"),
        ({"aligner": {"epoch": 3}}, "aligner.epoch: unknown key"),
    ]
    for update, message in refusals:
        with pytest.raises(ConfigError, match=message):
            parse_config(base | update, TrainConfig)
