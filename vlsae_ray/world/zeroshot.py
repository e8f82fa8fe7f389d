"""Zero-shot classification of world images by each attribute, with prompt ensembling.

A class's text embedding is the normalised mean of its prompts' embeddings (Radford et al. 2021,
sec. 3.1.4); the prompts name the class inside every shape and colour context and a few templates,
so e.g. "large" is compared with "small" across all objects rather than in one phrasing.
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


def class_prompts(attribute: str, value: str) -> list[str]:
    """Prompts for `attribute` = `value`, in canonical words, in every shape and colour context.

    The contexts include "no colour" and "no shape" (a generic noun), so that a class is not
    defined by pairs the model never saw: "circle" is carried by "a circle" as well as by the
    "a green circle" of a held-out pair.
    """
    shapes = [value] if attribute == "shape" else [*ATTRIBUTES["shape"], None]
    colours = [value] if attribute == "colour" else [*ATTRIBUTES["colour"], None]
    count = value if attribute == "count" else "one"
    adjective = ADJECTIVE_WORDS[attribute][value][0] if attribute in ADJECTIVE_WORDS else ""
    tail = TAIL_WORDS[attribute][value][0] if attribute in TAIL_WORDS else ""
    plural = count != "one"
    prompts = []
    for shape in shapes:
        noun = (SHAPE_WORDS[shape][0] if shape else GENERIC_NOUNS[0])[1 if plural else 0]
        for colour in colours:
            for template in TEMPLATES:
                text = template.format(
                    count=COUNT_WORDS[count][0],
                    adjective=adjective,
                    colour=COLOUR_WORDS[colour][0] if colour else "",
                    shape=noun,
                    tail=tail,
                    be="are" if plural else "is",
                )
                prompts.append(tidy(text))
    return prompts


def class_embeddings(model, tokenizer, attribute: str):
    """[n_classes, D] unit vectors, one per value of `attribute`, in ATTRIBUTES order."""
    import torch

    rows = []
    with torch.no_grad():
        for value in ATTRIBUTES[attribute]:
            emb = model.encode_text(tokenizer(class_prompts(attribute, value)), normalize=True)
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
