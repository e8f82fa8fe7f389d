"""Zero-shot classification of world images by each attribute, with prompt ensembling.

A class's text embedding is the normalised mean of its prompts' embeddings (Radford et al. 2021,
sec. 3.1.4); the prompts name the class with synonyms of the object, in every shape and every
colour context and a few templates, so e.g. "large" is compared with "small" across all objects
rather than in one phrasing.
"""

import time
from pathlib import Path

import numpy as np

from vlsae_ray.world.captions import tidy
from vlsae_ray.world.clip import CHECKPOINT_PATH, load_world_clip
from vlsae_ray.world.concepts import (
    ATTRIBUTES,
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    COUNT_WORDS,
    GENERIC_NOUNS,
    PATTERN_WORDS,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
)
from vlsae_ray.world.generator import WorldItem, generate_items

TEMPLATES = (
    "{count} {adjective} {colour} {shape} {tail}",
    "a photo of {count} {adjective} {colour} {shape} {tail}",
    "there {be} {count} {adjective} {colour} {shape} {tail}",
)
ADJECTIVE_WORDS = {"size": SIZE_WORDS, "pattern": PATTERN_WORDS}
TAIL_WORDS = {"position": POSITION_WORDS, "background": BACKGROUND_WORDS}


def _contexts(attribute: str, value: str) -> list[tuple[str | None, str | None]]:
    """(shape, colour) contexts for a class's prompts; None leaves that attribute unnamed.

    A shape is prompted without any colour and a colour without any shape (generic nouns), and
    other attributes with one or the other, never both: no prompt names a (shape, colour) pair,
    so no class is helped or hurt by pairs the model saw or never saw in training.
    """
    if attribute == "shape":
        return [(value, None)]
    if attribute == "colour":
        return [(None, value)]
    return [(s, None) for s in ATTRIBUTES["shape"]] + [(None, c) for c in ATTRIBUTES["colour"]]


def class_prompts(attribute: str, value: str) -> list[str]:
    """Prompts for `attribute` = `value` in canonical words, over contexts, nouns and templates."""
    count = value if attribute == "count" else "one"
    plural = count != "one"
    adjective = ADJECTIVE_WORDS[attribute][value][0] if attribute in ADJECTIVE_WORDS else ""
    tail = TAIL_WORDS[attribute][value][0] if attribute in TAIL_WORDS else ""
    prompts = []
    for shape, colour in _contexts(attribute, value):
        for noun in SHAPE_WORDS[shape] if shape else GENERIC_NOUNS:
            for template in TEMPLATES:
                text = template.format(
                    count=COUNT_WORDS[count][0],
                    adjective=adjective,
                    colour=COLOUR_WORDS[colour][0] if colour else "",
                    shape=noun[1 if plural else 0],
                    tail=tail,
                    be="are" if plural else "is",
                )
                prompts.append(tidy(text))
    return prompts


def class_embeddings(model, tokenizer, attribute: str):
    """[n_classes, D] unit vectors, one per value of `attribute`, in ATTRIBUTES order."""
    import torch

    rows = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for value in ATTRIBUTES[attribute]:
            emb = model.encode_text(tokenizer(class_prompts(attribute, value)).to(device), normalize=True)
            rows.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def zero_shot_accuracy(
    model, preprocess, tokenizer, items: list[WorldItem], attributes=tuple(ATTRIBUTES), batch_size: int = 256
) -> dict[str, float]:
    """Fraction of `items` whose label each attribute's zero-shot classifier gets right."""
    import torch

    features = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            images = torch.stack([preprocess(it.image) for it in items[i : i + batch_size]])
            features.append(model.encode_image(images, normalize=True))
    image_features = torch.cat(features)
    accuracy = {}
    for attribute in attributes:
        predicted = (image_features @ class_embeddings(model, tokenizer, attribute).T).argmax(-1).numpy()
        truth = np.array([ATTRIBUTES[attribute].index(it.labels[attribute]) for it in items])
        accuracy[attribute] = float((predicted == truth).mean())
    return accuracy


def evaluate_world_clip(
    checkpoint: str | Path = CHECKPOINT_PATH, *, n: int = 2000, seed: int = 0, threads: int = 2
) -> dict:
    """Held-out zero-shot accuracy per attribute of a world CLIP checkpoint, loaded as a user's is.

    Scores `n` items of the test split (only (shape, colour) pairs never seen in training).
    """
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, preprocess, tokenizer = load_world_clip(checkpoint=checkpoint)
    items = generate_items(n, split="test", seed=seed)
    accuracy = zero_shot_accuracy(model, preprocess, tokenizer, items)
    return {
        "accuracy": accuracy,
        "n_images": n,
        "split": "test",
        "checkpoint": str(checkpoint),
        "checkpoint_bytes": Path(checkpoint).stat().st_size,
        "eval_time_s": time.perf_counter() - start,
    }
