"""Downstream check: zero-shot accuracy of the backbone with the SAE spliced in, vs without, and a
VL-SAE's concept-level zero-shot.

The SAE's reconstruction replaces the activation at its hook point inside the model's forward
(`vlsae_ray.steer.steered` in "reconstruction" mode with no edits), and everything after the hook
point runs on it, as in Pach et al.'s interventions on the CLIP vision tower. The rows the SAE was
trained on decide what is replaced: the class token (token mode cls, the default), or every token
(all / random); a pooled or projected hook output ([B, d]) is replaced whole. A perfect SAE leaves
the accuracy unchanged; the drop measures what the reconstruction error costs the task.

A VL-SAE on the CLIP's image embedding (hook point `visual`, trained with the `text` embeddings)
also strengthens the classifier at the concept level (`concept_zeroshot`): its alpha is chosen per
task on validation images, then the test images are scored with it.

The tasks, with an open_clip backbone: the concept world's zero-shot classification
(`vlsae_ray.world.zeroshot`: one class per attribute value, prompt-ensembled class embeddings) on
generated items, or the user's labelled images (`image_classes`: one task named "class").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from vlsae_ray.backbones import load_backbone
from vlsae_ray.config import ZeroShotConfig
from vlsae_ray.eval.concept_zeroshot import (
    accuracy,
    choose_alpha,
    concept_level_similarity,
    embedding_level_similarity,
)
from vlsae_ray.sae import VLSAEConfig
from vlsae_ray.steer import steered

# the open_clip hook point of the image embedding (encode_image before normalisation)
IMAGE_EMBEDDING = "visual"


def splice_token(manifest_token: str) -> str:
    """Which tokens a spliced SAE replaces, from the token mode its training rows were read with."""
    if manifest_token == "mean":
        raise ValueError(
            "the SAE was trained on token-mean rows, which no single token of the model holds, so it cannot "
            "be spliced in; evaluate a cls or all-token SAE, or drop `zero_shot` from the evaluate config"
        )
    return "cls" if manifest_token == "cls" else "all"


def enhances(sae, hook_point: str) -> bool:
    """Whether concept-level zero-shot applies: a VL-SAE on the CLIP's image embedding."""
    return isinstance(sae.config, VLSAEConfig) and hook_point == IMAGE_EMBEDDING


class Images(NamedTuple):
    images: list  # PIL images
    truth: dict[str, torch.Tensor]  # task -> [N] true class index


class Task(NamedTuple):
    test: Images
    validation: Images
    classes: dict[str, torch.Tensor]  # task -> [C, D] unit class embeddings


@torch.no_grad()
def zero_shot_with_sae(
    config: ZeroShotConfig, hook_point: str, sae, token: str
) -> dict[str, dict[str, float]]:
    """{"without": {task: accuracy}, "with_sae": {...}}, and for a VL-SAE on `visual` also
    "enhanced" (concept-level, at the chosen alpha) and "alpha" (the alpha of each task)."""
    if config.backbone.library != "open_clip":
        raise ValueError(
            f"zero_shot.backbone.library is {config.backbone.library!r}; the zero-shot task runs an "
            "open_clip CLIP (e.g. the built-in world-clip)"
        )
    # world zero-shot feeds CPU tensors (vlsae_ray.world.zeroshot); the world CLIP is tiny
    backbone = load_backbone(config.backbone.model_copy(update={"device": "cpu"}))
    model, preprocess = backbone.model, backbone.preprocess
    make_task = world_task if config.task == "world" else file_task
    task = make_task(config, model, backbone.tokenizer)

    def encode(images: list) -> torch.Tensor:
        return image_embeddings(model, preprocess, images, config.batch_size)

    def accuracies(image_nd: torch.Tensor) -> dict[str, float]:
        return {
            name: accuracy(embedding_level_similarity(image_nd, classes), task.test.truth[name])
            for name, classes in task.classes.items()
        }

    test_nd = encode(task.test.images)
    result = {"without": accuracies(test_nd)}
    with steered(model, hook_point, sae, {}, mode="reconstruction", tokens=token):
        result["with_sae"] = accuracies(encode(task.test.images))
    if enhances(sae, hook_point):
        validation_nd = encode(task.validation.images)
        result["enhanced"], result["alpha"] = {}, {}
        for name, classes in task.classes.items():
            alpha, _ = choose_alpha(
                embedding_level_similarity(validation_nd, classes),
                concept_level_similarity(sae, validation_nd, classes),
                task.validation.truth[name],
                config.alphas,
            )
            scores = embedding_level_similarity(test_nd, classes) + alpha * concept_level_similarity(
                sae, test_nd, classes
            )
            result["enhanced"][name] = accuracy(scores, task.test.truth[name])
            result["alpha"][name] = alpha
    return result


@torch.no_grad()
def image_embeddings(model, preprocess, images: list, batch_size: int) -> torch.Tensor:
    """[N, D] raw image embeddings (the `visual` hook point's output), in batches."""
    batches = [
        model.encode_image(torch.stack([preprocess(image) for image in images[i : i + batch_size]]))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(batches).float()


def world_task(config: ZeroShotConfig, model, tokenizer) -> Task:
    """One task per world attribute: test items (`split`, `seed`), validation items (`validation_seed`)."""
    from vlsae_ray.world import ATTRIBUTES, generate_items
    from vlsae_ray.world.zeroshot import class_embeddings

    attributes = config.attributes or list(ATTRIBUTES)
    unknown = [name for name in attributes if name not in ATTRIBUTES]
    if unknown:
        raise ValueError(
            f"zero_shot.attributes {unknown} are not world attributes; choose from {list(ATTRIBUTES)}"
        )

    def images(n: int, seed: int) -> Images:
        items = generate_items(n, split=config.split, seed=seed)
        truth = {a: torch.tensor([ATTRIBUTES[a].index(item.labels[a]) for item in items]) for a in attributes}
        return Images([item.image for item in items], truth)

    return Task(
        images(config.n_items, config.seed),
        images(config.validation_items, config.validation_seed),
        {a: class_embeddings(model, tokenizer, a) for a in attributes},
    )


def file_task(config: ZeroShotConfig, model, tokenizer) -> Task:
    """The user's labelled images as one task, "class": a hashed share of them is the validation set."""
    from vlsae_ray.eval.image_classes import read_labelled_images
    from vlsae_ray.interpret.naming import in_heldout_fold

    data = read_labelled_images(config.images, config.classes, config.image_column, config.label_column)
    folds: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}
    for id_, image, label in zip(data.ids, data.images, data.labels, strict=True):
        images, labels = folds[in_heldout_fold(id_, config.validation_fraction)]
        images.append(image)
        labels.append(label)
    if not folds[True][0] or not folds[False][0]:
        raise ValueError(
            f"the {len(data.ids)} images of {config.images!r} leave no "
            f"{'validation' if not folds[True][0] else 'test'} image at validation_fraction="
            f"{config.validation_fraction}: give more images or change the fraction"
        )
    device = next(model.parameters()).device
    rows = []
    for name in data.class_names:
        prompts = [template.format(name) for template in config.templates]
        embedding = model.encode_text(tokenizer(prompts).to(device), normalize=True)
        rows.append(F.normalize(embedding.mean(0), dim=-1))

    def fold(validation: bool) -> Images:
        images, labels = folds[validation]
        return Images(images, {"class": torch.tensor(labels)})

    return Task(fold(False), fold(True), {"class": torch.stack(rows)})
