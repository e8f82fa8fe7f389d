import re

import numpy as np
import pytest
from scipy import ndimage

from vlsae_ray.world.concepts import ATTRIBUTES, COLOUR_WORDS, HELDOUT_COMBOS, SHAPE_WORDS, combos
from vlsae_ray.world.generator import generate_item, generate_items, generate_siblings
from vlsae_ray.world.render import PALETTE


@pytest.fixture(scope="module")
def train_items():
    return generate_items(400, split="train", seed=3)


def test_same_seed_same_item_other_seed_other_item():
    a, b = generate_item(17, seed=5), generate_item(17, seed=5)
    assert np.array_equal(a.pixels, b.pixels) and a.caption == b.caption and a.labels == b.labels
    assert a.id == b.id
    others = [generate_item(17, seed=s) for s in range(6, 10)]
    assert any(not np.array_equal(a.pixels, o.pixels) for o in others)


def test_every_item_has_one_valid_value_per_attribute(train_items):
    for item in train_items:
        assert set(item.labels) == set(ATTRIBUTES)
        for name, value in item.labels.items():
            assert value in ATTRIBUTES[name]
    seen = {name: {it.labels[name] for it in train_items} for name in ATTRIBUTES}
    assert seen == {name: set(values) for name, values in ATTRIBUTES.items()}


def test_pixels_show_the_labelled_colour(train_items):
    palette = np.array(list(PALETTE.values()), float)
    names = list(PALETTE)
    for item in train_items:
        object_px = item.pixels[item.mask].astype(float)
        # The brightest object pixel is the base colour; the pattern's second tone is a shade of it.
        base = object_px[object_px.sum(1).argmax()]
        assert names[np.linalg.norm(palette - base, axis=1).argmin()] == item.labels["colour"], item.id
        # Backgrounds are gray, so every coloured pixel belongs to the object.
        background = item.pixels[~item.mask]
        assert (background.max(1) == background.min(1)).all(), item.id


def test_solid_objects_come_in_the_labelled_count(train_items):
    solid = [it for it in train_items if it.labels["pattern"] == "solid"]
    assert len(solid) > 50
    for item in solid:
        _, n_components = ndimage.label(item.mask, structure=np.ones((3, 3)))
        assert n_components == ATTRIBUTES["count"].index(item.labels["count"]) + 1, item.id


def test_object_sits_on_the_labelled_side(train_items):
    for item in train_items:
        ys, xs = np.nonzero(item.mask)
        cx, cy = xs.mean() / 64, ys.mean() / 64
        expected = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6}
        assert expected.get(item.labels["position"], 0.35 < cx < 0.65 and 0.35 < cy < 0.65), item.id


def test_caption_names_only_the_labelled_colour_and_shape(train_items):
    colour_words = {w for ws in COLOUR_WORDS.values() for w in ws}
    shape_words = {n for pairs in SHAPE_WORDS.values() for pair in pairs for n in pair}
    for item in train_items:
        words = set(re.findall(r"[a-z-]+", item.caption))
        named_colours = colour_words & words
        assert named_colours <= set(COLOUR_WORDS[item.labels["colour"]]), item.caption
        own_nouns = {n for pair in SHAPE_WORDS[item.labels["shape"]] for n in pair}
        named_shapes = {n for n in shape_words if re.search(rf"\b{n}\b", item.caption)}
        assert named_shapes <= own_nouns, item.caption
        assert named_colours or named_shapes, item.caption
    assert len({it.caption for it in train_items}) > 0.9 * len(train_items)
    # Both are usually named, and each is sometimes left out.
    n_colour = sum(bool(colour_words & set(re.findall(r"[a-z-]+", it.caption))) for it in train_items)
    assert 0.6 * len(train_items) < n_colour < len(train_items)


def test_heldout_split_is_exactly_the_unseen_combinations():
    train, test = set(combos("train")), set(combos("test"))
    assert test == HELDOUT_COMBOS and not train & test
    assert {s for s, _ in train} == set(ATTRIBUTES["shape"])
    assert {c for _, c in train} == set(ATTRIBUTES["colour"])
    for item in generate_items(200, split="test"):
        assert (item.labels["shape"], item.labels["colour"]) in HELDOUT_COMBOS
    for item in generate_items(200, split="train"):
        assert (item.labels["shape"], item.labels["colour"]) not in HELDOUT_COMBOS


def test_siblings_share_every_label_but_shape_and_stay_in_their_split():
    group = generate_siblings(7, seed=3)
    colour = group[0].labels["colour"]
    assert [it.labels["shape"] for it in group] == [s for s, c in combos("train") if c == colour]
    for item in group:
        assert {**item.labels, "shape": None} == {**group[0].labels, "shape": None}
    assert len({it.id for it in group}) == len(group)
    again = generate_siblings(7, seed=3)
    assert all(
        np.array_equal(a.pixels, b.pixels) and a.caption == b.caption
        for a, b in zip(group, again, strict=True)
    )
    for item in generate_siblings(7, split="test", seed=3):
        assert (item.labels["shape"], item.labels["colour"]) in HELDOUT_COMBOS


def test_image_size_is_configurable_and_bad_values_are_named():
    assert generate_item(0, image_size=96).pixels.shape == (96, 96, 3)
    with pytest.raises(ValueError, match="image_size=8"):
        generate_item(0, image_size=8)
    with pytest.raises(ValueError, match="'val'"):
        generate_item(0, split="val")
