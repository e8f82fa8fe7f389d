"""The open_clip backbone against a hand-written forward pass of the same weights."""

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch.nn.utils.rnn import pad_sequence

from vlsae_ray import storage
from vlsae_ray.activations.sources import load_image, package_photo_items, source_items
from vlsae_ray.backbones import builtin_backbone, hook_dims, load_backbone, valid_hook_points
from vlsae_ray.config import SourceConfig, TokenConfig

BPE = SimpleTokenizer()  # open_clip's own tokenizer, built once
CAPTIONS = ["a red circle", "two small blue squares to the left of a green star", "a star"]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(builtin_backbone())


def manual_image_sequences(model, pixels) -> dict[str, torch.Tensor]:
    """{hook point: [B, T, d] or [B, d]} computed step by step from open_clip's parts."""
    visual, out = model.visual, {}
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    for i, resblock in enumerate(visual.transformer.resblocks):
        x = out[f"visual.transformer.resblocks.{i}"] = resblock(x)
    x = out["visual.ln_post"] = visual.ln_post(x)
    out["visual"] = x[:, 0] @ visual.proj
    return out


def manual_text(model, caption: str) -> tuple[dict[str, torch.Tensor], int]:
    """({hook point: [1, n, d] or [1, d]}, n) for one caption alone, unpadded: n = SOT + BPE + EOT."""
    ids = torch.tensor([[49406, *BPE.encode(caption), 49407]])
    n, out = ids.shape[1], {}
    x = model.token_embedding(ids) + model.positional_embedding[:n]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i, resblock in enumerate(model.transformer.resblocks):
        x = out[f"transformer.resblocks.{i}"] = resblock(x, attn_mask=causal)
    x = out["ln_final"] = model.ln_final(x)
    out["text"] = x[:, -1] @ model.text_projection
    return out, n


@torch.no_grad()
def test_image_hooks_equal_manual_forward(backbone, token, rows_match, images):
    pixels = backbone.pixels(images(3))
    hooks = [name for name, modality in backbone.hook_points.items() if modality == "image"]
    rows = backbone.activations(hooks, pixels=pixels, item_ids=["a", "b", "c"], token=token)
    expected = manual_image_sequences(backbone.model, pixels)
    assert set(rows) == set(expected)
    for name in hooks:
        rows_match(rows[name], expected[name], token)


@torch.no_grad()
def test_text_hooks_equal_manual_forward_of_each_caption_alone(backbone, token, rows_match):
    hooks = [name for name, modality in backbone.hook_points.items() if modality == "text"]
    rows = backbone.activations(hooks, pixels=None, texts=CAPTIONS, item_ids=CAPTIONS, token=token)
    singles = [manual_text(backbone.model, caption) for caption in CAPTIONS]
    lengths = [n for _, n in singles]
    assert len(set(lengths)) == 3  # captions of different lengths: padding is in play
    for name in hooks:
        parts = [out[name] for out, _ in singles]
        if parts[0].ndim == 2:
            reference = torch.cat(parts)
        else:  # pad to one length; the rows may only read each caption's first n tokens
            reference = pad_sequence([p[0] for p in parts], batch_first=True, padding_value=1e6)
        rows_match(rows[name], reference, token, lengths=lengths, cls=[n - 1 for n in lengths])


@torch.no_grad()
def test_one_forward_gives_both_towers(backbone, images):
    pixels = backbone.pixels(images(2))
    both = backbone.activations(
        ["visual", "text"], pixels=pixels, texts=CAPTIONS[:2], item_ids=["x", "y"], token=TokenConfig()
    )
    torch.testing.assert_close(both["visual"].values, backbone.model.encode_image(pixels))
    tokens = open_clip.get_tokenizer(backbone.config.model)(CAPTIONS[:2])
    torch.testing.assert_close(both["text"].values, backbone.model.encode_text(tokens))


@torch.no_grad()
def test_random_tokens_follow_the_item_not_the_batch(backbone, images):
    token = TokenConfig(mode="random", k=4, seed=3)
    pixels = backbone.pixels(images(3))
    hook = "visual.transformer.resblocks.1"
    alone = backbone.activations([hook], pixels=pixels[2:], item_ids=["c"], token=token)[hook]
    batch = backbone.activations([hook], pixels=pixels, item_ids=["a", "b", "c"], token=token)[hook]
    in_batch = batch.item == 2
    assert torch.equal(batch.token[in_batch], alone.token)
    torch.testing.assert_close(batch.values[in_batch], alone.values)
    # another item, or another seed, draws other tokens (fixed draws: this is not a flaky check)
    assert not torch.equal(batch.token[batch.item == 0], batch.token[batch.item == 1])
    reseeded = TokenConfig(mode="random", k=4, seed=4)
    other = backbone.activations([hook], pixels=pixels[2:], item_ids=["c"], token=reseeded)[hook]
    assert not torch.equal(other.token, alone.token)


def test_missing_input_is_a_clear_error(backbone, images):
    with pytest.raises(ValueError, match=r"hook point 'ln_final' reads texts, but texts=None was passed"):
        backbone.activations(["ln_final"], pixels=backbone.pixels(images(1)), item_ids=["a"])
    with pytest.raises(ValueError, match=r"hook point 'visual' reads pixels, but pixels=None was passed"):
        backbone.activations(["visual"], texts=["a star"], item_ids=["a"])
    with pytest.raises(ValueError, match=r"got 1 items, 2 item_ids"):
        backbone.activations(["text"], texts=["a star"], item_ids=["a", "b"])


def test_checkpoint_from_s3_loads_the_same_weights(backbone, s3_root):
    uri = storage.join(s3_root, "models", "world-clip.pt")
    storage.write_bytes(uri, storage.read_bytes(backbone.config.pretrained))
    from_s3 = load_backbone(backbone.config.model_copy(update={"pretrained": uri}))
    for name, tensor in backbone.model.state_dict().items():
        assert torch.equal(tensor, from_s3.model.state_dict()[name]), name
    random_init = open_clip.create_model(backbone.config.model)
    assert not torch.equal(random_init.visual.conv1.weight, backbone.model.visual.conv1.weight)


def test_preprocess_matches_open_clip(backbone, images):
    _, _, preprocess = open_clip.create_model_and_transforms(backbone.config.model)
    image = images(1)[0]
    assert torch.equal(backbone.pixels([image])[0], preprocess(image))


@torch.no_grad()
def test_hook_dims_without_weights_match_real_widths(backbone, images):
    hooks = list(valid_hook_points(backbone.config))
    dims = hook_dims(backbone.config, hooks)
    rows = backbone.activations(
        hooks, pixels=backbone.pixels(images(1)), texts=["a star"], item_ids=["a"], token=TokenConfig()
    )
    assert dims == {name: row.values.shape[1] for name, row in rows.items()}
    width, embed_dim = backbone.model.visual.conv1.out_channels, backbone.model.text_projection.shape[1]
    assert dims["visual.transformer.resblocks.3"] == width and dims["visual"] == dims["text"] == embed_dim
    assert dims["ln_final"] == backbone.model.ln_final.normalized_shape[0]


def test_bad_hook_point_lists_valid_ones(backbone):
    with pytest.raises(
        ValueError,
        match=r"'visual.blocks.9' is not in this model; valid hook points: visual.transformer.resblocks.0, "
        r".*visual.ln_post, visual, transformer.resblocks.0, .*ln_final, text$",
    ):
        hook_dims(backbone.config, ["visual.blocks.9"])
    with pytest.raises(ValueError, match=r"'text.ln_final' is not in this model"):
        backbone.activations(["text.ln_final"], texts=["a"], item_ids=["a"])


@pytest.mark.parametrize("kind", ["world", "package_photos"])
def test_source_images_are_deterministic(kind):
    items = source_items(SourceConfig(kind=kind, n_items=300))
    assert len({item["id"] for item in items}) == 300 and all(item["caption"] for item in items)
    first = [load_image(item["id"]).tobytes() for item in items[:3]]
    assert first == [load_image(item["id"]).tobytes() for item in items[:3]]
    assert (
        items[:5] == package_photo_items(5)
        if kind == "package_photos"
        else items[0]["id"].startswith("world-")
    )
