"""The open_clip backbone against a hand-written forward pass of the same weights."""

import open_clip
import pytest
import torch
from PIL import Image

from vlsae_ray import storage
from vlsae_ray.activations.sources import load_image, package_photo_items, source_items
from vlsae_ray.backbones import Backbone, builtin_backbone, hook_dims
from vlsae_ray.config import SourceConfig


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone(builtin_backbone())


def images(n: int) -> list[Image.Image]:
    return [load_image(item["id"]) for item in source_items(SourceConfig(n_items=n))]


def manual_residual(model, pixels, block: int) -> torch.Tensor:
    """The CLS residual stream after `block`, computed step by step from open_clip's parts."""
    visual = model.visual
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    for resblock in visual.transformer.resblocks[: block + 1]:
        x = resblock(x)
    return x[:, 0]


def test_checkpoint_from_s3_loads_the_same_weights(backbone, s3_root):
    uri = storage.join(s3_root, "models", "world-clip.pt")
    storage.write_bytes(uri, storage.read_bytes(backbone.config.pretrained))
    from_s3 = Backbone(backbone.config.model_copy(update={"pretrained": uri}))
    for name, tensor in backbone.model.state_dict().items():
        assert torch.equal(tensor, from_s3.model.state_dict()[name]), name
    random_init = open_clip.create_model(backbone.config.model)
    assert not torch.equal(random_init.visual.conv1.weight, backbone.model.visual.conv1.weight)


@torch.no_grad()
def test_block_activation_equals_manual_forward(backbone):
    pixels = backbone.pixels(images(4))
    acts = backbone.activations(pixels, ["visual.transformer.resblocks.1", "visual"])
    expected = manual_residual(backbone.model, pixels, 1)
    torch.testing.assert_close(acts["visual.transformer.resblocks.1"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts["visual"], backbone.model.encode_image(pixels), rtol=1e-5, atol=1e-5)


def test_preprocess_matches_open_clip(backbone):
    _, _, preprocess = open_clip.create_model_and_transforms(backbone.config.model)
    image = images(1)[0]
    assert torch.equal(backbone.pixels([image])[0], preprocess(image))


def test_hook_dims_without_weights(backbone):
    dims = hook_dims(backbone.config, ["visual.transformer.resblocks.3", "visual"])
    acts = backbone.activations(backbone.pixels(images(1)), list(dims))
    assert dims == {name: value.shape[-1] for name, value in acts.items()}
    width, embed_dim = backbone.model.visual.conv1.out_channels, backbone.model.text_projection.shape[1]
    assert dims == {"visual.transformer.resblocks.3": width, "visual": embed_dim}


def test_bad_hook_point_lists_valid_ones(backbone):
    with pytest.raises(
        ValueError,
        match=r"'visual.blocks.9' is not in this model; valid hook points: visual.transformer.resblocks.0",
    ):
        hook_dims(backbone.config, ["visual.blocks.9"])


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
