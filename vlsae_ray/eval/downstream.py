"""Downstream check: zero-shot accuracy of the backbone with the SAE spliced in, vs without.

The SAE's reconstruction replaces the activation at its hook point inside the model's forward (a
torch forward hook), and everything after the hook point runs on it, as in Pach et al.'s
interventions on the CLIP vision tower. The rows the SAE was trained on decide what is replaced:
the class token (token mode cls, the default), or every token (all / random); a pooled or
projected hook output ([B, d]) is replaced whole. A perfect SAE leaves the accuracy unchanged; the
drop measures what the reconstruction error costs the task.

The task: the concept world's zero-shot classification (`vlsae_ray.world.zeroshot`: one class per
attribute value, prompt-ensembled class embeddings) on generated items, with an open_clip backbone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from vlsae_ray.backbones import load_backbone
from vlsae_ray.config import ZeroShotConfig


@contextlib.contextmanager
def spliced(
    model: torch.nn.Module,
    hook_point: str,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    token: str = "cls",
) -> Iterator[None]:
    """Within the block, `hook_point`'s output is replaced by `reconstruct` of it ([n, d] -> [n, d])."""
    module = model.get_submodule(hook_point)
    batch_first = True
    if ".resblocks." in hook_point:  # open_clip towers built with batch_first=False run as [T, B, d]
        batch_first = getattr(
            model.get_submodule(hook_point.rsplit(".resblocks.", 1)[0]), "batch_first", True
        )

    def hook(_module, _inputs, output):
        rest = ()
        if isinstance(output, tuple):
            output, *rest = output
        if output.ndim == 2:
            replaced = reconstruct(output)
        else:
            x_btd = output if batch_first else output.transpose(0, 1)
            x_btd = x_btd.clone()
            if token == "cls":
                x_btd[:, 0] = reconstruct(x_btd[:, 0])
            else:
                x_btd = reconstruct(x_btd.reshape(-1, x_btd.shape[-1])).reshape(x_btd.shape)
            replaced = x_btd if batch_first else x_btd.transpose(0, 1)
        return (replaced, *rest) if rest else replaced

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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
    config: ZeroShotConfig, hook_point: str, reconstruct: Callable[[torch.Tensor], torch.Tensor], token: str
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

    def on_device(x_nd: torch.Tensor) -> torch.Tensor:
        return reconstruct(x_nd.float().cpu()).to(x_nd.device, x_nd.dtype)

    with spliced(model, hook_point, on_device, token):
        with_sae = zero_shot_accuracy(model, preprocess, tokenizer, items, attributes, config.batch_size)
    return {"without": without, "with_sae": with_sae}
