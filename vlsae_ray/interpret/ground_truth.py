"""Checking latents against the concept world's ground truth.

A world item carries one value per attribute (shape, colour, size, ...). The concept a set of
items shares is the attribute value with the largest chance-corrected agreement
(fraction - chance) / (1 - chance), where chance is 1 / (number of values of the attribute), so an
attribute with few values does not win just by being common.
"""

from __future__ import annotations

from collections import Counter

from vlsae_ray.activations.sources import world_labels
from vlsae_ray.world import ATTRIBUTES


def shared_concept(source_ids: list[str]) -> tuple[str, float] | None:
    """("attribute=value", fraction of the items that have it) for world items; None otherwise."""
    labels = [world_labels(item_id) for item_id in source_ids]
    if not labels or any(label is None for label in labels):
        return None
    counts = Counter((attribute, value) for label in labels for attribute, value in label.items())

    def agreement(concept: tuple[str, str]) -> float:
        chance = 1 / len(ATTRIBUTES[concept[0]])
        return (counts[concept] / len(labels) - chance) / (1 - chance)

    attribute, value = max(counts, key=agreement)
    return f"{attribute}={value}", counts[(attribute, value)] / len(labels)
