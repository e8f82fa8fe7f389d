"""Captions for world scenes: templates with synonyms, varied word order and optional details.

Count is always named, and colour or shape or both; each detail is left out now and then, as a
human caption would. Captions that name a shape without its colour (and the reverse) are what
let the text side hold "circle" apart from "green", so held-out pairs can be scored zero-shot.
"""

import re

import numpy as np

from vlsae_ray.world.concepts import (
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    COUNT_WORDS,
    GENERIC_NOUNS,
    PATTERN_WORDS,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
)

# How often each optional detail is named.
MENTION_P = {"shape": 0.85, "colour": 0.85, "size": 0.75, "pattern": 0.75, "position": 0.8, "background": 0.5}

TEMPLATES = (
    "{count} {size} {pattern} {colour} {shape} {position} {background}",
    "there {be} {count} {size} {colour} {pattern} {shape} {position} {background}",
    "{position}, {count} {pattern} {colour} {size} {shape} {background}",
    "{count} {size} {pattern} {shape} {position}, {colour} {background}",
    "an image showing {count} {pattern} {size} {colour} {shape} {background} {position}",
    "{background}: {count} {colour} {size} {shape} {position}, {pattern}",
)


def _pick(rng: np.random.Generator, words: list):
    return words[rng.integers(len(words))]


def tidy(text: str) -> str:
    """Collapse the gaps and stray punctuation that left-out details leave; fix "a" before a vowel."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,:])", r"\1", text)
    text = re.sub(r"([,:])(?=[,:])", "", text)  # a dropped detail leaves doubled punctuation
    text = re.sub(r"^[,:]\s*|[,:]\s*$", "", text.strip())
    text = re.sub(r"\ba ([aeiou])", r"an \1", text)
    return text.strip()


def caption(labels: dict[str, str], rng: np.random.Generator) -> str:
    """One caption for `labels`, drawn from `rng`."""
    plural = labels["count"] != "one"
    named_shape = rng.random() < MENTION_P["shape"]
    named_colour = not named_shape or rng.random() < MENTION_P["colour"]
    nouns = SHAPE_WORDS[labels["shape"]] if named_shape else GENERIC_NOUNS
    slots = {
        "count": _pick(rng, COUNT_WORDS[labels["count"]]),
        "colour": _pick(rng, COLOUR_WORDS[labels["colour"]]) if named_colour else "",
        "shape": _pick(rng, nouns)[1 if plural else 0],
        "be": "are" if plural else "is",
    }
    details = {
        "size": SIZE_WORDS,
        "pattern": PATTERN_WORDS,
        "position": POSITION_WORDS,
        "background": BACKGROUND_WORDS,
    }
    for name, words in details.items():
        named = rng.random() < MENTION_P[name]
        slots[name] = _pick(rng, words[labels[name]]) if named else ""
    return tidy(_pick(rng, TEMPLATES).format(**slots))


# Words a caption can hold for each attribute value (shapes in both numbers).
_SWAPPABLE = {
    "shape": {s: [w for pair in pairs for w in pair] for s, pairs in SHAPE_WORDS.items()},
    "colour": COLOUR_WORDS,
    "size": SIZE_WORDS,
    "pattern": PATTERN_WORDS,
    "position": POSITION_WORDS,
    "background": BACKGROUND_WORDS,
}


def hard_negative(
    text: str, labels: dict[str, str], attribute: str, rng: np.random.Generator, value: str | None = None
) -> str | None:
    """`text` with the words for `attribute` swapped to `value`'s (default: another value drawn from
    `rng`), or None if it names none.

    The swap keeps template, word order and grammatical number, so only that one attribute tells
    the caption from its negative (NegCLIP's hard negatives, Yuksekgonul et al. 2023).
    """
    words = _SWAPPABLE[attribute]
    # Longest first, so "plus signs" is matched whole rather than as "plus sign".
    pattern = "|".join(re.escape(w) for w in sorted(words[labels[attribute]], key=len, reverse=True))
    match = re.search(rf"\b({pattern})\b", text)
    if match is None:
        return None
    if value is None:
        other = [v for v in words if v != labels[attribute]]
        value = other[rng.integers(len(other))]
    if attribute == "shape":
        plural = labels["count"] != "one"
        new = _pick(rng, SHAPE_WORDS[value])[1 if plural else 0]
    else:
        new = _pick(rng, words[value])
    swapped = text[: match.start()] + new + text[match.end() :]
    return tidy(re.sub(r"\ban\b", "a", swapped))  # tidy puts back "an" where the new word needs it
