"""Image-caption sources: each item has a stable id, a caption, and an image made on demand.

`world` is the built-in ground-truth concept world (`vlsae_ray.world`): every item also carries
its concept labels. `package_photos` uses the real photos that ship inside scikit-image,
scikit-learn and matplotlib (no download), enlarged to a few thousand items by seeded random crops
and flips. An item's image is a pure function of its id, so any CPU task can rebuild it and a
rerun makes the same pixels.
"""

from __future__ import annotations

import functools
import random
import re

import numpy as np
from PIL import Image

from vlsae_ray.config import SourceConfig
from vlsae_ray.world import generate_item

_WORLD_ID = re.compile(r"world-(?P<split>\w+)-s(?P<seed>\d+)-(?P<index>\d+)")

# name -> (loader, caption); captions say what a person sees in the photo.
_PHOTOS = {
    "astronaut": ("skimage:astronaut", "a photo of an astronaut in a space suit"),
    "coffee": ("skimage:coffee", "a photo of a cup of coffee"),
    "chelsea": ("skimage:chelsea", "a photo of a cat"),
    "rocket": ("skimage:rocket", "a photo of a rocket on a launch pad"),
    "hubble": ("skimage:hubble_deep_field", "a photo of galaxies in deep space"),
    "cells": ("skimage:immunohistochemistry", "a microscope photo of stained cells"),
    "retina": ("skimage:retina", "a photo of a human retina"),
    "colorwheel": ("skimage:colorwheel", "a colour wheel"),
    "camera": ("skimage:camera", "a black and white photo of a man with a camera"),
    "coins": ("skimage:coins", "a black and white photo of coins"),
    "moon": ("skimage:moon", "a black and white photo of the moon's surface"),
    "brick": ("skimage:brick", "a black and white photo of a brick wall"),
    "grass": ("skimage:grass", "a black and white photo of grass"),
    "gravel": ("skimage:gravel", "a black and white photo of gravel"),
    "text": ("skimage:text", "a photo of printed text"),
    "china": ("sklearn:china.jpg", "a photo of a chinese temple"),
    "flower": ("sklearn:flower.jpg", "a photo of a flower"),
    "grace_hopper": ("matplotlib:grace_hopper.jpg", "a portrait photo of a woman in uniform"),
}


@functools.cache
def _photo(name: str) -> Image.Image:
    library, key = _PHOTOS[name][0].split(":")
    if library == "skimage":
        import skimage.data

        array = getattr(skimage.data, key)()
    elif library == "sklearn":
        from sklearn.datasets import load_sample_image

        array = load_sample_image(key)
    else:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(key) as f:
            return Image.open(f).convert("RGB")
    return Image.fromarray(np.asarray(array)).convert("RGB")


def package_photo_items(n_items: int, seed: int = 0) -> list[dict]:
    """`n_items` items cycling over the package photos; item i is crop i of its photo."""
    names = sorted(_PHOTOS)
    return [
        {
            "id": f"{names[i % len(names)]}/{seed}-{i // len(names)}",
            "caption": _PHOTOS[names[i % len(names)]][1],
        }
        for i in range(n_items)
    ]


def source_items(config: SourceConfig) -> list[dict]:
    """The source's items as {"id", "caption"}, in a fixed order (item i always comes i-th)."""
    if config.kind == "world":
        items = (generate_item(i, split=config.split, seed=config.seed) for i in range(config.n_items))
        return [{"id": item.id, "caption": item.caption} for item in items]
    return package_photo_items(config.n_items, config.seed)


def world_labels(item_id: str) -> dict[str, str] | None:
    """The ground-truth concept labels of a world item (None for other sources)."""
    match = _WORLD_ID.fullmatch(item_id)
    if match is None:
        return None
    return _world_item(match).labels


def _world_item(match: re.Match):
    return generate_item(int(match["index"]), split=match["split"], seed=int(match["seed"]))


def load_image(item_id: str) -> Image.Image:
    """The image of any source's item id."""
    if match := _WORLD_ID.fullmatch(item_id):
        return _world_item(match).image
    # package photos: a seeded crop (40-100% of the short side) and flip
    name, crop = item_id.split("/")
    if name not in _PHOTOS:
        raise KeyError(f"unknown package photo {name!r} in item id {item_id!r}")
    photo = _photo(name)
    rng = random.Random(f"{name}/{crop}")
    width, height = photo.size
    side = int(min(width, height) * rng.uniform(0.4, 1.0))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    image = photo.crop((left, top, left + side, top + side))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image
