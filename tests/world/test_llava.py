"""The committed world LLaVA: loaded as a user's LLaVA, its vision tower the world CLIP's, and its
held-out answers right as often as the README says."""

import json

import pytest
import torch

from vlsae_ray.world.clip import load_world_clip
from vlsae_ray.world.generator import generate_item, generate_items
from vlsae_ray.world.llava import (
    ONE_WORD_PROMPT,
    VISION_FEATURE_HOOK,
    WORLD_LLAVA_PATH,
    answer,
    evaluate_world_llava,
    load_world_llava,
    prompt,
)


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(2)
    llava, processor = load_world_llava()
    clip, preprocess, _ = load_world_clip()
    return llava, processor, clip, preprocess


def test_committed_folder_loads_as_a_users_llava():
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(WORLD_LLAVA_PATH, local_files_only=True)
    processor = AutoProcessor.from_pretrained(WORLD_LLAVA_PATH, local_files_only=True)
    assert isinstance(processor, LlavaProcessor)
    assert (WORLD_LLAVA_PATH / "model.safetensors").is_file()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == prompt("Describe the image.") == "USER: <image>\nDescribe the image. ASSISTANT:"
    inputs = processor(images=generate_item(0).image, text=text, return_tensors="pt")
    image_id = model.config.image_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_id
    assert (inputs["input_ids"] == image_id).sum() == model.config.image_seq_length == 64
    assert model.get_submodule(VISION_FEATURE_HOOK) is model.model.vision_tower.encoder.layers[2]


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


def test_vision_tower_is_the_world_clips(models):
    """An SAE trained on open_clip's resblocks.2 reads the same activations at VISION_FEATURE_HOOK."""
    llava, processor, clip, preprocess = models
    images = [it.image for it in generate_items(3, split="test")]
    pixels = torch.stack([preprocess(im) for im in images])
    hf_pixels = processor(images=images, text=[prompt("a")] * 3, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(hf_pixels, pixels, atol=1e-5, rtol=0)
    residuals = _open_clip_residuals(clip, pixels)
    hidden = []
    hook = llava.get_submodule(VISION_FEATURE_HOOK).register_forward_hook(lambda m, i, o: hidden.append(o))
    try:
        with torch.no_grad():
            features = torch.stack(llava.model.get_image_features(pixel_values=pixels).pooler_output)
    finally:
        hook.remove()
    torch.testing.assert_close(hidden[0], residuals[2], atol=1e-4, rtol=1e-4)
    # and LLaVA's projector reads that block's patches (vision_feature_layer=-2, class token dropped)
    with torch.no_grad():
        expected = llava.model.multi_modal_projector(residuals[2][:, 1:])
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)


def test_batched_answers_equal_answers_one_by_one(models):
    """Left padding: each row of a batch with different questions answers as it would alone."""
    llava, processor, _, _ = models
    items = generate_items(4, split="test", seed=5)
    questions = [
        ONE_WORD_PROMPT,
        "Describe the image.",
        "Is there a red star in the image?",
        "How many objects are there?",
    ]
    images = [it.image for it in items]
    batched = answer(llava, processor, images, questions)
    assert batched == [answer(llava, processor, [im], q)[0] for im, q in zip(images, questions, strict=True)]
    assert answer(llava, processor, images, ONE_WORD_PROMPT) == [
        answer(llava, processor, [im], ONE_WORD_PROMPT)[0] for im in images
    ]
    with pytest.raises(ValueError, match="4 images but 2 questions"):
        answer(llava, processor, images, questions[:2])


# The README's table (`vlsae world eval-llava --n 500 --seed 0`), and issue 14's held-out goals:
# shape and colour >= 0.9, yes/no >= 0.85. Items and greedy answers are deterministic, so this
# is that measurement again; the tolerance allows for another CPU flipping a near-tie argmax.
README_TABLE = {
    "shape": 0.91,
    "colour": 0.976,
    "size": 0.962,
    "position": 1.0,
    "count": 0.998,
    "pattern": 0.27,
    "background": 1.0,
    "one_word": 0.91,
    "describe": 0.224,
    "pope_random": 0.983,
    "pope_popular": 0.958,
    "pope_adversarial": 0.966,
}
GOALS = {"shape": 0.9, "colour": 0.9, "pope_random": 0.85, "pope_popular": 0.85, "pope_adversarial": 0.85}


def test_held_out_accuracy_is_the_readmes_and_meets_the_goals():
    accuracy = evaluate_world_llava(500, seed=0, threads=1)
    assert accuracy == pytest.approx(README_TABLE, abs=0.006)  # 3 of 500 answers
    for question_type, goal in GOALS.items():
        assert accuracy[question_type] >= goal, (question_type, accuracy)


def test_eval_llava_command_prints_evaluate_world_llava(capsys):
    from vlsae_ray.cli import main

    assert main(["world", "eval-llava", "--n", "8", "--seed", "3", "--threads", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == evaluate_world_llava(8, seed=3)
    assert set(printed) == set(README_TABLE)
