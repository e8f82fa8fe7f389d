"""The concept vocabulary of the world: attributes, their values, words for them, and the split.

Every item shows `count` copies of one object kind (shape, colour, pattern, size) grouped at one
position on one background, so each attribute has exactly one true value per image.
"""

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "cross", "heart"),
    "colour": ("red", "green", "blue", "yellow", "purple", "orange", "white"),
    "size": ("small", "large"),
    "position": ("left", "right", "top", "bottom", "centre"),
    "count": ("one", "two", "three"),
    "pattern": ("solid", "striped", "dotted", "checkered"),
    "background": ("black", "gray", "noise"),
}

# (shape, colour) pairs never shown in training; the test split is made of exactly these.
# Every colour and every shape appears here at least once and still appears in training with
# other partners, so held-out accuracy measures composition, not unseen words.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {
        ("circle", "green"),
        ("square", "purple"),
        ("triangle", "red"),
        ("triangle", "white"),
        ("star", "blue"),
        ("cross", "orange"),
        ("heart", "yellow"),
    }
)

SPLITS = ("train", "test")


def combos(split: str) -> list[tuple[str, str]]:
    """The (shape, colour) pairs a split draws from: training pairs, or the held-out ones."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    every = [(s, c) for s in ATTRIBUTES["shape"] for c in ATTRIBUTES["colour"]]
    return [p for p in every if (p in HELDOUT_COMBOS) == (split == "test")]


# Caption words. The first word of each list is the canonical one used by zero-shot prompts.
COLOUR_WORDS = {
    "red": ["red", "crimson", "scarlet"],
    "green": ["green", "emerald"],
    "blue": ["blue", "azure"],
    "yellow": ["yellow", "golden"],
    "purple": ["purple", "violet"],
    "orange": ["orange", "tangerine"],
    "white": ["white", "snowy"],
}
SHAPE_WORDS = {  # (singular, plural)
    "circle": [("circle", "circles"), ("disc", "discs")],
    "square": [("square", "squares"), ("block", "blocks")],
    "triangle": [("triangle", "triangles")],
    "star": [("star", "stars")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "heart": [("heart", "hearts")],
}
# Nouns for a caption that leaves the shape unnamed ("two striped red objects").
GENERIC_NOUNS = [("object", "objects"), ("shape", "shapes"), ("thing", "things")]
SIZE_WORDS = {"small": ["small", "tiny", "little"], "large": ["large", "big", "huge"]}
PATTERN_WORDS = {
    "solid": ["solid", "plain", "filled"],
    "striped": ["striped", "stripy"],
    "dotted": ["dotted", "spotted", "polka-dot"],
    "checkered": ["checkered", "chequered", "checked"],
}
COUNT_WORDS = {"one": ["a", "one", "a single"], "two": ["two", "a pair of"], "three": ["three"]}
POSITION_WORDS = {
    "left": ["on the left", "at the left", "to the left"],
    "right": ["on the right", "at the right", "to the right"],
    "top": ["at the top", "in the top half", "near the top"],
    "bottom": ["at the bottom", "in the bottom half", "near the bottom"],
    "centre": ["in the centre", "in the middle", "in the center"],
}
BACKGROUND_WORDS = {
    "black": ["on a black background", "on black"],
    "gray": ["on a gray background", "on grey"],
    "noise": ["on a noisy background", "on static"],
}
