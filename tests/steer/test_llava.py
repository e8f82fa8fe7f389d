"""Steering LLaVA inside its vision tower (transformers CLIP), at the layer that feeds the projector:
exact without edits, and a steered `generate()` equal to a manual decode on hand-edited features."""

import pytest
import torch

from vlsae_ray.sae import build_sae
from vlsae_ray.steer import steered
from vlsae_ray.world import generate_items
from vlsae_ray.world.llava import ATTRIBUTE_QUESTIONS, VISION_FEATURE_HOOK, load_world_llava, prompt


@pytest.fixture(scope="module")
def llava():
    """The committed world LLaVA asked one question about 3 held-out images (one prompt length, so
    no padding), and a random SAE at the vision layer its projector reads."""
    model, processor = load_world_llava()
    items = generate_items(3, split="test", seed=5)
    text = [prompt(ATTRIBUTE_QUESTIONS["colour"])] * len(items)
    inputs = dict(processor(images=[it.image for it in items], text=text, return_tensors="pt"))
    torch.manual_seed(0)
    sae = build_sae({"architecture": "topk", "d_in": 96, "n_latents": 384, "k": 12}).eval()
    with torch.no_grad():
        sae.b_dec_d.normal_(0, 0.1)
    return model, inputs, sae


def test_no_edits_leave_llava_bit_identical(llava):
    model, inputs, sae = llava
    with torch.no_grad():
        plain = model(**inputs).logits
        with steered(model, VISION_FEATURE_HOOK, sae, {}):
            assert torch.equal(model(**inputs).logits, plain)
        with steered(model, VISION_FEATURE_HOOK, sae, {5: 30.0}):
            assert not torch.allclose(model(**inputs).logits, plain)


def _manual_greedy(model, inputs, features_bpd, steps):
    """Greedy decoding with no cache and no hook: the image placeholders' embeddings are the
    projector's output on `features_bpd`, recomputed from scratch at every step; the end token is
    never chosen (as `generate(min_new_tokens=steps)` does)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image = ids == model.config.image_token_id
    width = model.config.text_config.hidden_size
    projected = model.model.multi_modal_projector(features_bpd).reshape(-1, width)
    embeds = model.get_input_embeddings()(ids)
    embeds[image] = projected
    new = []
    for _ in range(steps):
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
        logits[:, model.generation_config.eos_token_id] = float("-inf")
        token = logits.argmax(-1)
        new.append(token)
        embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
    return torch.stack(new, 1)


@pytest.mark.parametrize("mode", ["delta", "reconstruction"])
def test_steered_generate_equals_a_manual_decode_on_edited_features(llava, mode):
    model, inputs, sae = llava
    latent, value, steps = 5, 40.0, 4
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        h = hidden[-2][:, 1:]  # vision_feature_layer=-2, class token dropped
        h_nd = h.reshape(-1, h.shape[-1])
        z = sae.encode(h_nd)
        z_edit = z.clone()
        z_edit[:, latent] = value
        edited = h_nd + sae.decode(z_edit) - sae.decode(z) if mode == "delta" else sae.decode(z_edit)
        expected = _manual_greedy(model, inputs, edited.reshape(h.shape), steps)
        plain = _manual_greedy(model, inputs, h, steps)
        with steered(model, VISION_FEATURE_HOOK, sae, {latent: value}, mode=mode, tokens="patches"):
            out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
    generated = out[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(generated, expected)
    assert mode == "delta" or not torch.equal(expected, plain)  # the edit reached the answer
