"""The LLaVA backbone against the model's own hidden states, on prompts built here by hand."""

import re

import pytest
import torch

from vlsae_ray import storage
from vlsae_ray.backbones import hook_dims, load_backbone, required_inputs, valid_hook_points
from vlsae_ray.backbones.hooks import run_with_hooks
from vlsae_ray.config import BackboneConfig, TokenConfig

CAPTIONS = ["a red circle", "two small blue squares to the left of a green star"]


@pytest.fixture(scope="module")
def backbone(llava_folder):
    return load_backbone(BackboneConfig(library="llava", model=str(llava_folder), device="cpu"))


@torch.no_grad()
def test_vision_tower_hooks_equal_hidden_states(backbone, token, rows_match, images):
    pixels = backbone.pixels(images(2))
    hooks = [f"vision_tower.encoder.layers.{i}" for i in range(4)]
    rows = backbone.activations(hooks, pixels=pixels, item_ids=["a", "b"], token=token)
    hidden = backbone.model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    for i, name in enumerate(hooks):
        rows_match(rows[name], hidden[i + 1], token)


@torch.no_grad()
def test_vision_feature_layer_is_block_minus_2(backbone, images):
    """LLaVA's projector reads block n-2 without its class token: the hook at that block, all tokens."""
    pixels = backbone.pixels(images(1))
    hook = "vision_tower.encoder.layers.2"
    rows = backbone.activations([hook], pixels=pixels, item_ids=["a"], token=TokenConfig(mode="all"))[hook]
    features = backbone.model.model.get_image_features(pixel_values=pixels)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    projected = backbone.model.model.multi_modal_projector(rows.values[1:])
    torch.testing.assert_close(projected, torch.cat(list(features)).reshape(projected.shape))


@torch.no_grad()
def test_language_means_equal_hidden_states_of_each_prompt_alone(backbone, images):
    pixels = backbone.pixels(images(2))
    hooks = [f"language_model.layers.{i}:{part}_mean" for i in (0, 1) for part in ("image", "text")]
    rows = backbone.activations(hooks, pixels=pixels, texts=CAPTIONS, item_ids=["a", "b"])
    model, n_image = backbone.model.model, 64  # (64 / 8) ** 2 patches of the world CLIP
    vocab, image_id = backbone.tokenizer.get_vocab(), backbone.model.config.image_token_id
    norm, model.language_model.norm = model.language_model.norm, torch.nn.Identity()
    try:  # without the final norm the last hidden state is the last layer's raw output
        for b, caption in enumerate(CAPTIONS):
            # the world tokenizer by hand: lower-cased words and runs of punctuation, after <s>
            caption_ids = [vocab[w] for w in re.findall(r"\w+|[^\w\s]+", caption.lower())]
            ids = torch.tensor([[vocab["<s>"], *[image_id] * n_image, *caption_ids]])
            out = model(input_ids=ids, pixel_values=pixels[b : b + 1], output_hidden_states=True)
            image_t, text_t = slice(1, 1 + n_image), slice(1 + n_image, 1 + n_image + len(caption_ids))
            for i in (0, 1):
                h_td = out.hidden_states[i + 1][0]
                expected = {
                    f"language_model.layers.{i}:image_mean": h_td[image_t].mean(0),
                    f"language_model.layers.{i}:text_mean": h_td[text_t].mean(0),
                }
                for name, value in expected.items():
                    assert rows[name].token[b] == -1 and rows[name].item[b] == b
                    torch.testing.assert_close(rows[name].values[b], value, rtol=1e-4, atol=1e-5)
    finally:
        model.language_model.norm = norm
    for name in hooks:
        assert rows[name].values.shape == (2, backbone.model.config.text_config.hidden_size)


@torch.no_grad()
def test_chat_means_are_the_authors_reduction(backbone, images):
    """`:chat_*_mean` at layer i: the hidden state entering layer i (the output of layer i - 1) on
    "USER: <image>\n{caption} ASSISTANT:", the text mean over every token after the image."""
    pixels = backbone.pixels(images(2))
    hooks = [f"language_model.layers.{i}:chat_{part}_mean" for i in (0, 2) for part in ("image", "text")]
    rows = backbone.activations(hooks, pixels=pixels, texts=CAPTIONS, item_ids=["a", "b"])
    model, n_image = backbone.model.model, 64
    vocab, image_id = backbone.tokenizer.get_vocab(), backbone.model.config.image_token_id
    for b, caption in enumerate(CAPTIONS):
        words = [
            "user",
            ":",
            *[None] * n_image,
            *re.findall(r"\w+|[^\w\s]+", caption.lower()),
            "assistant",
            ":",
        ]
        ids = torch.tensor([[vocab["<s>"], *[image_id if w is None else vocab[w] for w in words]]])
        image_t, text_t = slice(3, 3 + n_image), slice(3 + n_image, ids.shape[1])
        captured, out = run_with_hooks(
            model,
            ["language_model.layers.1"],
            lambda: model(input_ids=ids, pixel_values=pixels[b : b + 1], output_hidden_states=True),  # noqa: B023
        )
        inputs = {0: out.hidden_states[0][0]}  # the embeddings, image features merged in
        inputs[2] = captured["language_model.layers.1"][0]  # layer 1's output enters layer 2
        for i, h_td in inputs.items():
            for part, t in (("image", image_t), ("text", text_t)):
                value = rows[f"language_model.layers.{i}:chat_{part}_mean"].values[b]
                torch.testing.assert_close(value, h_td[t].mean(0), rtol=1e-4, atol=1e-5)


def test_hook_points_dims_and_errors(backbone, images):
    points = valid_hook_points(backbone.config)
    assert points["vision_tower.encoder.layers.3"] == "image"
    assert points["language_model.layers.1:image_mean"] == "image"
    assert points["language_model.layers.1:text_mean"] == "text"
    assert required_inputs(backbone.config, ["vision_tower.encoder.layers.0"]) == {"pixels"}
    assert required_inputs(backbone.config, ["language_model.layers.0:image_mean"]) == {"pixels", "texts"}
    dims = hook_dims(backbone.config, list(points))
    assert {dims[name] for name in points if name.startswith("vision_tower.")} == {96}
    text = backbone.model.config.text_config
    assert {dims[name] for name in points if name.startswith("language_model.")} == {text.hidden_size}
    last = text.num_hidden_layers - 1
    with pytest.raises(
        ValueError,
        match=rf"'language_model.layers.{last + 1}:text_mean' is not in this model; valid "
        rf"hook points: vision_tower.encoder.layers.0, .*language_model.layers.{last}:chat_text_mean$",
    ):
        hook_dims(backbone.config, [f"language_model.layers.{last + 1}:text_mean"])
    with pytest.raises(ValueError, match=r"'language_model.layers.0:text_mean' reads texts, but texts=None"):
        backbone.activations(
            ["language_model.layers.0:text_mean"], pixels=backbone.pixels(images(1)), item_ids=["a"]
        )


@torch.no_grad()
def test_s3_folder_gives_the_local_folders_activations(
    backbone, llava_folder, s3_root, tmp_path, monkeypatch, images, upload
):
    monkeypatch.setenv("VLSAE_CACHE", str(tmp_path))
    folder = upload(llava_folder, storage.join(s3_root, "llava"))
    remote = load_backbone(backbone.config.model_copy(update={"model": folder}))
    pixels = remote.pixels(images(2))
    assert torch.equal(pixels, backbone.pixels(images(2)))
    hooks = [
        "vision_tower.encoder.layers.2",
        "language_model.layers.1:image_mean",
        "language_model.layers.1:text_mean",
    ]
    inputs = {"pixels": pixels, "texts": CAPTIONS, "item_ids": ["a", "b"], "token": TokenConfig(mode="all")}
    mine, local = remote.activations(hooks, **inputs), backbone.activations(hooks, **inputs)
    for name in hooks:
        assert all(torch.equal(a, b) for a, b in zip(mine[name], local[name], strict=True)), name
