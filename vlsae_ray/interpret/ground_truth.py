"""Checking latents against the concept world's ground truth.

A world item carries one value per attribute (shape, colour, size, ...). The concept a set of
items shares is the attribute value with the largest chance-corrected agreement
(fraction - chance) / (1 - chance), where chance is 1 / (number of values of the attribute), so an
attribute with few values does not win just by being common.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

from vlsae_ray.activations.sources import world_labels
from vlsae_ray.world import ATTRIBUTES

# top sets of different latents share many items, and a world item's labels cost a render
_labels = lru_cache(maxsize=2**16)(world_labels)


def shared_concept(source_ids: list[str]) -> tuple[str, float] | None:
    """("attribute=value", fraction of the items that have it) for world items; None otherwise."""
    labels = [_labels(item_id) for item_id in source_ids]
    if not labels or any(label is None for label in labels):
        return None
    counts = Counter((attribute, value) for label in labels for attribute, value in label.items())

    def agreement(concept: tuple[str, str]) -> float:
        chance = 1 / len(ATTRIBUTES[concept[0]])
        return (counts[concept] / len(labels) - chance) / (1 - chance)

    attribute, value = max(counts, key=agreement)
    return f"{attribute}={value}", counts[(attribute, value)] / len(labels)


_POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
# The vocabulary phrase (`vocabulary: world`, and the world part of the default) of each world concept.
WORLD_NAMES = {
    **{("colour", c): f"{c} objects" for c in ATTRIBUTES["colour"]},
    **{("shape", s): "crosses" if s == "cross" else f"{s}s" for s in ATTRIBUTES["shape"]},
    **{("size", s): f"{s} objects" for s in ATTRIBUTES["size"]},
    **{("pattern", p): f"{p} objects" for p in ATTRIBUTES["pattern"]},
    **{("count", c): f"{c} object" if c == "one" else f"{c} objects" for c in ATTRIBUTES["count"]},
    **{("position", p): f"objects {_POSITIONS.get(p, 'in the centre')}" for p in ATTRIBUTES["position"]},
    **{("background", b): f"a {'noisy' if b == 'noise' else b} background" for b in ATTRIBUTES["background"]},
}


def held_names(source_ids: list[str]) -> set[str] | None:
    """The vocabulary names of the world concepts that all but at most one of these items hold (a
    latent's top images often share two or three, e.g. "three large white objects", and any of them
    is a right name); None when they are not all world items."""
    labels = [_labels(source_id) for source_id in source_ids]
    if not labels or any(label is None for label in labels):
        return None
    return {
        name
        for (attribute, value), name in WORLD_NAMES.items()
        if sum(label[attribute] == value for label in labels) >= len(labels) - 1
    }


def reliability(confidence: list[float], right: list[bool], edges=(0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0)):
    """Rows (low, high, names, mean confidence, share right) of names binned by confidence."""
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        chosen = [(c, r) for c, r in zip(confidence, right, strict=True) if low <= c < high or c == high == 1]
        if chosen:
            mean = sum(c for c, _ in chosen) / len(chosen)
            rows.append((low, high, len(chosen), mean, sum(r for _, r in chosen) / len(chosen)))
    return rows
