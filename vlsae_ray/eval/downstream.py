"""Downstream check: zero-shot accuracy of the backbone with the SAE spliced in, vs without.

The SAE's reconstruction replaces the activation at its hook point inside the model's forward
(`vlsae_ray.steer.steered` in "reconstruction" mode with no edits), and everything after the hook
point runs on it, as in Pach et al.'s interventions on the CLIP vision tower. The rows the SAE was
trained on decide what is replaced: the class token (token mode cls, the default), or every token
(all / random); a pooled or projected hook output ([B, d]) is replaced whole. A perfect SAE leaves
the accuracy unchanged; the drop measures what the reconstruction error costs the task.

The task: the concept world's zero-shot classification (`vlsae_ray.world.zeroshot`: one class per
attribute value, prompt-ensembled class embeddings) on generated items, with an open_clip backbone.
"""

from __future__ import annotations

import torch

from vlsae_ray.backbones import load_backbone
from vlsae_ray.config import ZeroShotConfig
from vlsae_ray.steer import steered


def splice_token(manifest_token: str) -> str:
    """Which tokens a spliced SAE replaces, from the token mode its training rows were read with."""
    if manifest_token == "mean":
        raise ValueError(
            "the SAE was trained on token-mean rows, which no single token of the model holds, so it cannot "
            "be spliced in; evaluate a cls or all-token SAE, or drop `zero_shot` from the evaluate config"
        )
    return "cls" if manifest_token == "cls" else "all"


@torch.no_grad()
def zero_shot_with_sae(
    config: ZeroShotConfig, hook_point: str, sae, token: str
) -> dict[str, dict[str, float]]:
    """{"without": {attribute: accuracy}, "with_sae": {...}} on the world's items."""
    from vlsae_ray.world import ATTRIBUTES, generate_items, zero_shot_accuracy

    if config.backbone.library != "open_clip":
        raise ValueError(
            f"zero_shot.backbone.library is {config.backbone.library!r}; the world zero-shot task runs an "
            "open_clip CLIP (e.g. the built-in world-clip)"
        )
    attributes = config.attributes or list(ATTRIBUTES)
    unknown = [name for name in attributes if name not in ATTRIBUTES]
    if unknown:
        raise ValueError(
            f"zero_shot.attributes {unknown} are not world attributes; choose from {list(ATTRIBUTES)}"
        )
    # world zero-shot feeds CPU tensors (vlsae_ray.world.zeroshot); the world CLIP is tiny
    backbone = load_backbone(config.backbone.model_copy(update={"device": "cpu"}))
    items = generate_items(config.n_items, split=config.split, seed=config.seed)
    model, preprocess, tokenizer = backbone.model, backbone.preprocess, backbone.tokenizer
    without = zero_shot_accuracy(model, preprocess, tokenizer, items, attributes, config.batch_size)
    with steered(model, hook_point, sae, {}, mode="reconstruction", tokens=token):
        with_sae = zero_shot_accuracy(model, preprocess, tokenizer, items, attributes, config.batch_size)
    return {"without": without, "with_sae": with_sae}
