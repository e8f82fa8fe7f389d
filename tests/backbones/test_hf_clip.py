"""The transformers CLIP backbone against the model's own hidden states (`output_hidden_states`)."""

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from vlsae_ray import storage
from vlsae_ray.backbones import hook_dims, image_preprocessor, load_backbone, valid_hook_points
from vlsae_ray.config import BackboneConfig, TokenConfig

CAPTIONS = ["a red circle", "two small blue squares to the left of a green star", "a star"]


@pytest.fixture(scope="module")
def backbone(hf_clip_folder):
    return load_backbone(BackboneConfig(library="transformers", model=str(hf_clip_folder), device="cpu"))


@torch.no_grad()
def test_image_hooks_equal_hidden_states(backbone, token, rows_match, images):
    from transformers import CLIPImageProcessor

    pil = images(3)
    processor = CLIPImageProcessor.from_pretrained(backbone.config.model)
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    assert torch.equal(backbone.pixels(pil), pixels)
    hooks = [name for name, modality in backbone.hook_points.items() if modality == "image"]
    rows = backbone.activations(hooks, pixels=pixels, item_ids=["a", "b", "c"], token=token)
    model = backbone.model
    out = model.vision_model(pixel_values=pixels, output_hidden_states=True)
    expected = {f"vision_model.encoder.layers.{i}": h for i, h in enumerate(out.hidden_states[1:])}
    expected["vision_model.post_layernorm"] = out.pooler_output
    expected["visual_projection"] = model.visual_projection(out.pooler_output)
    assert set(rows) == set(expected) and len(expected) == 5
    for name in hooks:
        rows_match(rows[name], expected[name], token)


@torch.no_grad()
def test_text_hooks_equal_hidden_states_of_each_caption_alone(backbone, token, rows_match):
    hooks = [name for name, modality in backbone.hook_points.items() if modality == "text"]
    rows = backbone.activations(hooks, texts=CAPTIONS, item_ids=CAPTIONS, token=token)
    model, singles = backbone.model, []
    for caption in CAPTIONS:  # one at a time: no padding, the EOT is the last token
        ids = backbone.tokenizer(caption, return_tensors="pt").input_ids
        out = model.text_model(input_ids=ids, output_hidden_states=True)
        single = {f"text_model.encoder.layers.{i}": h[0] for i, h in enumerate(out.hidden_states[1:])}
        single["text_model.final_layer_norm"] = out.last_hidden_state[0]
        single["text_projection"] = model.text_projection(out.last_hidden_state[0, -1])
        singles.append(single)
    lengths = [len(single["text_model.final_layer_norm"]) for single in singles]
    assert len(set(lengths)) == 3
    for name in hooks:
        parts = [single[name] for single in singles]
        reference = torch.stack(parts) if parts[0].ndim == 1 else pad_sequence(parts, batch_first=True)
        rows_match(rows[name], reference, token, lengths=lengths, cls=[n - 1 for n in lengths])


@torch.no_grad()
def test_hook_dims_match_real_widths(backbone, images):
    hooks = list(valid_hook_points(backbone.config))
    pixels = torch.stack([image_preprocessor(backbone.config)(image) for image in images(1)])
    rows = backbone.activations(hooks, pixels=pixels, texts=["a star"], item_ids=["a"], token=TokenConfig())
    dims = hook_dims(backbone.config, hooks)
    assert dims == {name: row.values.shape[1] for name, row in rows.items()}
    assert dims["visual_projection"] == 16 and dims["vision_model.encoder.layers.2"] == 48
    assert dims["text_model.final_layer_norm"] == 32


def test_bad_hook_point_and_bad_folder(backbone, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"'vision_model.encoder.layers.3' is not in this model; valid hook points: "
        r"vision_model.encoder.layers.0, .*visual_projection, text_model.encoder.layers.0, "
        r".*text_projection$",
    ):
        hook_dims(backbone.config, ["vision_model.encoder.layers.3"])
    with pytest.raises(ValueError, match=r"is not a save_pretrained folder \(no config.json there\)"):
        hook_dims(backbone.config.model_copy(update={"model": str(tmp_path)}), ["visual_projection"])
    with pytest.raises(ValueError, match=r"holds a 'clip' model, not 'llava'; use library: transformers"):
        valid_hook_points(backbone.config.model_copy(update={"library": "llava"}))


def cached_files(cache) -> dict:
    return {path: path.stat().st_mtime_ns for path in cache.rglob("*")}


@torch.no_grad()
def test_s3_folder_gives_the_local_folders_activations(
    backbone, hf_clip_folder, s3_root, tmp_path, monkeypatch, images, upload
):
    monkeypatch.setenv("VLSAE_CACHE", str(tmp_path))
    folder = upload(hf_clip_folder, storage.join(s3_root, "clip"))
    config = backbone.config.model_copy(update={"model": folder})
    hooks = list(valid_hook_points(config))
    planned = list((tmp_path / "folders").iterdir())
    assert len(planned) == 1 and (planned[0] / "config.json").is_file()
    assert not list(planned[0].glob("*.safetensors"))  # checking hook points downloads no weights

    remote = load_backbone(config)
    pixels = remote.pixels(images(2))
    assert torch.equal(pixels, backbone.pixels(images(2)))
    inputs = {
        "pixels": pixels,
        "texts": CAPTIONS[:2],
        "item_ids": ["a", "b"],
        "token": TokenConfig(mode="all"),
    }
    mine, local = remote.activations(hooks, **inputs), backbone.activations(hooks, **inputs)
    for name in hooks:
        assert all(torch.equal(a, b) for a, b in zip(mine[name], local[name], strict=True)), name

    before = cached_files(tmp_path)
    load_backbone(config)
    assert cached_files(tmp_path) == before  # a second load downloads nothing
    with pytest.raises(ValueError, match=r"is not a save_pretrained folder \(no config.json there\)"):
        valid_hook_points(config.model_copy(update={"model": storage.join(s3_root, "empty")}))
