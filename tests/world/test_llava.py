import pytest
import torch

from vlsae_ray.world.clip import load_world_clip
from vlsae_ray.world.generator import generate_item
from vlsae_ray.world.llava import build_world_llava, llava_input_ids


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(2)
    llava, processor = build_world_llava()
    clip, preprocess, _ = load_world_clip()
    return llava, processor, clip, preprocess


def _open_clip_residuals(clip, pixels):
    """Residual stream after every open_clip block, [n_blocks] x [B, tokens, width]."""
    out = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: out.append(o)) for b in clip.visual.transformer.resblocks
    ]
    with torch.no_grad():
        clip.visual(pixels)
    for h in hooks:
        h.remove()
    return out


def test_hf_vision_tower_reproduces_open_clip_residual_stream(models):
    llava, processor, clip, preprocess = models
    image = generate_item(5, split="test").image
    pixels = preprocess(image).unsqueeze(0)
    hf_pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, hf_pixels, atol=1e-5)

    residuals = _open_clip_residuals(clip, pixels)
    with torch.no_grad():
        hidden = llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == len(residuals) + 1  # hidden_states[0] is the embedding output
    for block, residual in enumerate(residuals):
        assert torch.allclose(hidden[block + 1], residual, atol=1e-4), block


def test_llava_image_features_are_projected_block_minus_2_patches(models):
    llava, processor, clip, preprocess = models
    pixels = preprocess(generate_item(6, split="test").image).unsqueeze(0)
    patches = _open_clip_residuals(clip, pixels)[-2][:, 1:]  # LLaVA drops CLS at layer -2
    with torch.no_grad():
        features = torch.stack(llava.model.get_image_features(pixel_values=pixels).pooler_output)
        expected = llava.model.multi_modal_projector(patches)
    assert features.shape == expected.shape == (1, llava.config.image_seq_length, 64)
    assert torch.allclose(features, expected, atol=1e-4)


def test_llava_generates_logits_that_depend_on_the_image(models):
    llava, processor, _, _ = models
    n_image_tokens = llava.config.image_seq_length
    ids = llava_input_ids("what colour is the shape?", n_image_tokens)
    logits = []
    for index in (1, 2):
        pixels = processor(images=generate_item(index).image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits.append(llava(input_ids=ids, pixel_values=pixels).logits[0, -1])
    assert logits[0].shape == (llava.config.text_config.vocab_size,)
    assert not torch.allclose(logits[0], logits[1])
