"""The open_clip backbone against a hand-written forward pass of the same weights."""

import open_clip
import pytest
import torch
from PIL import Image

from vlsae_ray.activations.sources import load_image, package_photo_items
from vlsae_ray.backbones import Backbone, hook_dims, save_builtin_checkpoint
from vlsae_ray.config import BackboneConfig


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Backbone:
    checkpoint = save_builtin_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny.pt"), seed=3)
    return Backbone(BackboneConfig(model="vlsae-tiny-clip", pretrained=checkpoint))


def images(n: int) -> list[Image.Image]:
    return [load_image(item["id"]) for item in package_photo_items(n)]


def manual_residual(model, pixels, block: int) -> torch.Tensor:
    """The CLS residual stream after `block`, computed step by step from open_clip's parts."""
    visual = model.visual
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    for resblock in visual.transformer.resblocks[: block + 1]:
        x = resblock(x)
    return x[:, 0]


def test_checkpoint_loads_through_open_clip(backbone, tmp_path):
    torch.manual_seed(3)
    reference = open_clip.create_model("vlsae-tiny-clip")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, backbone.model.state_dict()[name]), name


@torch.no_grad()
def test_block_activation_equals_manual_forward(backbone):
    pixels = backbone.pixels(images(4))
    acts = backbone.activations(pixels, ["visual.transformer.resblocks.1", "visual"])
    expected = manual_residual(backbone.model, pixels, 1)
    torch.testing.assert_close(acts["visual.transformer.resblocks.1"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts["visual"], backbone.model.encode_image(pixels), rtol=1e-5, atol=1e-5)


def test_preprocess_matches_open_clip(backbone):
    _, _, preprocess = open_clip.create_model_and_transforms("vlsae-tiny-clip")
    image = images(1)[0]
    assert torch.equal(backbone.pixels([image])[0], preprocess(image))


def test_hook_dims_without_weights(backbone):
    dims = hook_dims(backbone.config, ["visual.transformer.resblocks.3", "visual"])
    acts = backbone.activations(backbone.pixels(images(1)), list(dims))
    assert (
        dims
        == {name: value.shape[-1] for name, value in acts.items()}
        == {"visual.transformer.resblocks.3": 128, "visual": 64}
    )


def test_bad_hook_point_lists_valid_ones(backbone):
    with pytest.raises(
        ValueError,
        match=r"'visual.blocks.9' is not in this model; valid hook points: visual.transformer.resblocks.0",
    ):
        hook_dims(backbone.config, ["visual.blocks.9"])


def test_package_photo_items_are_deterministic():
    first, second = images(3), images(3)
    assert [im.tobytes() for im in first] == [im.tobytes() for im in second]
    assert len({item["id"] for item in package_photo_items(500)}) == 500
