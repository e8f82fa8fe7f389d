import re

import numpy as np
import pytest
from scipy import ndimage

from vlsae_ray.world.captions import hard_negative
from vlsae_ray.world.concepts import ATTRIBUTES, COLOUR_WORDS, HELDOUT_COMBOS, SHAPE_WORDS, combos
from vlsae_ray.world.generator import generate_item, generate_items
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


def test_image_size_is_configurable_and_bad_values_are_named():
    assert generate_item(0, image_size=96).pixels.shape == (96, 96, 3)
    with pytest.raises(ValueError, match="image_size=8"):
        generate_item(0, image_size=8)
    with pytest.raises(ValueError, match="'val'"):
        generate_item(0, split="val")


def _shape_words(shape: str, plural: bool) -> list[str]:
    return sorted({pair[1 if plural else 0] for pair in SHAPE_WORDS[shape]}, key=len, reverse=True)


def _without(text: str, words: list[str]) -> str:
    """`text` with the first of `words` (longest first) replaced by NOUN and every article as "a"."""
    pattern = "|".join(re.escape(w) for w in words)
    return re.sub(r"\ban?\b", "a", re.sub(rf"\b({pattern})\b", "NOUN", text, count=1))


def test_shape_negative_changes_only_the_shape_word(train_items):
    rng = np.random.default_rng(0)
    swapped = 0
    for item in train_items:
        plural = item.labels["count"] != "one"
        own = _shape_words(item.labels["shape"], plural)
        negative = hard_negative(item.caption, item.labels, "shape", rng)
        if "NOUN" not in _without(item.caption, own):
            assert negative is None, item.caption  # a caption with a generic noun has no shape to swap
            continue
        swapped += 1
        named = [s for s in ATTRIBUTES["shape"] if "NOUN" in _without(negative, _shape_words(s, plural))]
        assert len(named) == 1 and named[0] != item.labels["shape"], (item.caption, negative)
        assert _without(negative, _shape_words(named[0], plural)) == _without(item.caption, own)
        assert not re.search(r"\ban [^aeiou]|\ba [aeiou]", negative), negative
    assert swapped > 0.7 * len(train_items)


def test_negative_for_a_chosen_value_names_that_value_with_the_right_article(train_items):
    rng = np.random.default_rng(1)
    swapped = 0
    for item in train_items:
        colour = "orange" if item.labels["colour"] != "orange" else "red"  # "an orange" <-> "a red"
        negative = hard_negative(item.caption, item.labels, "colour", rng, colour)
        if negative is None:
            continue
        swapped += 1
        words = set(re.findall(r"[a-z-]+", negative))
        assert words & set(COLOUR_WORDS[colour]) and not words & set(COLOUR_WORDS[item.labels["colour"]])
        assert not re.search(r"\ban [^aeiou]|\ba [aeiou]", negative), negative
    assert swapped > 0.5 * len(train_items)
