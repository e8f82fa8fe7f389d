"""Hallucination mitigation on the world LLaVA with a random aligner and VL-SAE: exactly plain
decoding at alpha = 0 or cd_alpha = 0, the text concepts equal to the image's at beta = 1, the
hook's shift against a direct computation, and bad settings refused before any forward."""

import math

import pytest
import torch

from vlsae_ray.sae import build_sae
from vlsae_ray.sae.aligner import Aligner, AlignerConfig
from vlsae_ray.steer.hallucination import (
    DEFAULTS,
    concept_mixing,
    generate_mitigated,
    mitigated_logits,
    mix_concepts,
    positions,
)
from vlsae_ray.world.llava import answer, load_world_llava
from vlsae_ray.world.vqa import DESCRIBE_PROMPT, vqa_item

LAYER = 1


@pytest.fixture(scope="module")
def world():
    """The committed world LLaVA, 4 held-out items, a random aligner (96 -> 48) and VL-SAE (48 wide)."""
    model, processor = load_world_llava()
    items = [vqa_item(i, split="test", seed=3) for i in range(4)]
    torch.manual_seed(0)
    aligner = Aligner(AlignerConfig(d_in=96, d_proj=48)).eval()
    sae = build_sae({"architecture": "vl_sae", "d_in": 48, "n_latents": 192, "k": 12}).eval()
    return model, processor, items, aligner, sae


def _inputs(processor, items, questions):
    turns = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions
    ]
    batch = processor(
        images=[item.image for item, _ in items],
        text=processor.apply_chat_template(turns, add_generation_prompt=True),
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    position_ids = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    return {**batch, "position_ids": position_ids}


def test_alpha_zero_or_cd_alpha_zero_decode_exactly_as_the_plain_model(world):
    model, processor, items, aligner, sae = world
    # prompts of different lengths, so rows are padded
    vqa = [questions for _, questions in items]
    questions = [DESCRIBE_PROMPT, vqa[1][-1].question, vqa[2][0].question, DESCRIBE_PROMPT]
    inputs = _inputs(processor, items, questions)
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
    options = {**DEFAULTS, "layer": LAYER}
    scores, plain_l, edited = mitigated_logits(
        model, inputs, aligner, sae, **options | {"alpha": 0.0, "cd_alpha": 0.0}
    )
    assert torch.equal(plain_l, plain) and torch.equal(edited, plain)
    assert torch.equal(scores[scores > -math.inf], plain[scores > -math.inf])
    scores, _, edited = mitigated_logits(model, inputs, aligner, sae, **options | {"cd_alpha": 0.0})
    assert not torch.allclose(edited, plain)  # the edit does change the model
    kept = plain >= math.log(DEFAULTS["cd_beta"]) + plain.max(-1, keepdim=True).values
    assert torch.equal(scores[kept], plain[kept]) and bool((scores[~kept] == -math.inf).all())
    images = [item.image for item, _ in items]
    expected = answer(model, processor, images, questions, max_new_tokens=5)
    for change in ({"alpha": 0.0}, {"cd_alpha": 0.0}):
        options = {"layer": LAYER, "max_new_tokens": 5, **change}
        assert generate_mitigated(model, processor, images, questions, aligner, sae, **options) == expected


def test_beta_one_gives_the_text_side_the_image_concepts(world):
    _, _, _, aligner, sae = world
    torch.manual_seed(1)
    v_bd, t_bd = torch.randn(5, 96), torch.randn(5, 96)
    z_v = sae.encode(aligner.project(v_bd, "vision"))
    shift, z_mixed = mix_concepts(v_bd, t_bd, aligner, sae, alpha=1.0, beta=1.0)
    assert torch.equal(z_mixed, z_v)
    assert not torch.equal(sae.encode(aligner.project(t_bd, "text")), z_v)
    t_hat = aligner.decode(sae.decode(z_v, "text"), "text")
    torch.testing.assert_close(t_bd + shift, t_hat)  # alpha = 1: the text mean becomes the decoded one


@torch.no_grad()
def test_every_text_position_moves_by_the_mean_shift_and_image_positions_stay(world):
    model, processor, items, aligner, sae = world
    inputs = _inputs(processor, items, [DESCRIBE_PROMPT] * len(items))
    image_bt, text_bt = positions(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id)
    assert int(image_bt.sum(1)[0]) == 64 and int(text_bt.sum(1)[0]) == 6  # "describe the image . assistant :"
    h = model(**inputs, output_hidden_states=True).hidden_states[LAYER + 1]  # layer LAYER's output
    v = (h * image_bt[..., None]).sum(1) / image_bt.sum(1, keepdim=True)
    t = (h * text_bt[..., None]).sum(1) / text_bt.sum(1, keepdim=True)
    shift, _ = mix_concepts(v, t, aligner, sae, alpha=0.8, beta=0.9)
    with concept_mixing(model, LAYER, aligner, sae, image_bt, text_bt, alpha=0.8, beta=0.9):
        edited = model(**inputs, output_hidden_states=True).hidden_states[LAYER + 1]
    change = edited - h
    assert torch.equal(change[~text_bt], torch.zeros_like(change[~text_bt]))
    torch.testing.assert_close(change, text_bt[..., None] * shift[:, None], rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused(world):
    model, processor, items, aligner, sae = world
    images, question = [items[0][0].image], DESCRIBE_PROMPT
    topk = build_sae({"architecture": "topk", "d_in": 48, "n_latents": 96, "k": 4})
    wide = build_sae({"architecture": "vl_sae", "d_in": 96, "n_latents": 192, "k": 4})
    refusals = [
        ({"alpha": 1.5}, aligner, sae, r"alpha=1.5 must lie in \[0, 1\]"),
        ({"cd_alpha": -0.1}, aligner, sae, r"cd_alpha=-0.1 must lie in \[0, 1\]"),
        ({"cd_beta": 0.0}, aligner, sae, r"cd_beta=0.0 must lie in \(0, 1\]"),
        ({"layer": 3}, aligner, sae, r"layer=3: the language model has layers 0..2"),
        ({}, Aligner(AlignerConfig(d_in=64, d_proj=48)), sae, "the aligner reads width 64"),
        ({}, aligner, topk, "needs a VL-SAE"),
        ({}, aligner, wide, "the VL-SAE reads width 96, but the aligner projects to 48"),
    ]
    for change, a, s, message in refusals:
        with pytest.raises(ValueError, match=message):
            generate_mitigated(model, processor, images, question, a, s, **{"layer": LAYER} | change)
    with pytest.raises(ValueError, match="1 images but 2 questions"):
        generate_mitigated(model, processor, images, [question] * 2, aligner, sae, layer=LAYER)
