"""Deterministic image-caption pairs with known concepts: item `index` of `split` under `seed`.

Every item is a pure function of (seed, split, index, image_size): the same arguments give the
same pixels, caption and labels on any machine, so a dataset is just a range of indices.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlsae_ray.world.captions import caption
from vlsae_ray.world.concepts import ATTRIBUTES, SPLITS, combos
from vlsae_ray.world.render import render_scene

DEFAULT_IMAGE_SIZE = 64


@dataclass(frozen=True)
class WorldItem:
    id: str
    pixels: np.ndarray  # uint8 [H, W, 3]
    caption: str
    labels: dict[str, str]  # attribute -> value, one per name in ATTRIBUTES
    mask: np.ndarray  # bool [H, W], True on object pixels

    @property
    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels, "RGB")


def _check_size(image_size: int) -> None:
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small to draw shapes; use 16 or more")


def _other_labels(shape: str, colour: str, rng: np.random.Generator) -> dict[str, str]:
    labels = {"shape": shape, "colour": colour}
    for name, values in ATTRIBUTES.items():
        if name not in labels:
            labels[name] = values[rng.integers(len(values))]
    return labels


def _item(item_id: str, labels: dict[str, str], image_size: int, rng: np.random.Generator) -> WorldItem:
    scene = render_scene(labels, image_size, rng)
    return WorldItem(
        id=item_id, pixels=scene.pixels, caption=caption(labels, rng), labels=labels, mask=scene.mask
    )


def generate_item(
    index: int, *, split: str = "train", seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE
) -> WorldItem:
    """Item `index` of `split` ("train": seen (shape, colour) pairs; "test": held-out pairs)."""
    _check_size(image_size)
    pairs = combos(split)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    labels = _other_labels(*pairs[rng.integers(len(pairs))], rng)
    return _item(f"world-{split}-s{seed}-{index:08d}", labels, image_size, rng)


def generate_items(
    n: int, *, split: str = "train", seed: int = 0, start: int = 0, image_size: int = DEFAULT_IMAGE_SIZE
) -> list[WorldItem]:
    """Items `start` .. `start + n - 1` of `split`."""
    return [generate_item(i, split=split, seed=seed, image_size=image_size) for i in range(start, start + n)]
