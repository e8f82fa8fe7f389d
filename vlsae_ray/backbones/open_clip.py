"""open_clip backbones: loading through open_clip's own factory, and the outputs of hook points.

A hook point is the name of a module in the model (`model.named_modules()`); its activation is
that module's output. Image tower: `visual.transformer.resblocks.{i}` is the residual stream after
vision block i ([B, tokens, d]; token 0 is the class token), `visual.ln_post` the final norm over
the sequence, `visual` the image embedding after the projection ([B, embed_dim]). Text tower:
`transformer.resblocks.{i}` and `ln_final` over the token sequence, `text` the text embedding
(`encode_text`). Text is tokenized by open_clip's tokenizer for the model; the real tokens of a
caption are those up to the position the model pools (its EOT token).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import open_clip
import torch

from vlsae_ray import storage
from vlsae_ray.backbones.hooks import run_with_hooks
from vlsae_ray.backbones.rows import HookOutput
from vlsae_ray.config import BackboneConfig
from vlsae_ray.world.clip import CHECKPOINT_PATH, MODEL_NAME, register_world_clip

register_world_clip()  # the built-in model is a name open_clip knows, like any other


def builtin_backbone(checkpoint_uri: str | None = None) -> BackboneConfig:
    """The embedded default: the concept world's tiny CLIP with its committed checkpoint.

    With `checkpoint_uri` the checkpoint is first copied there (e.g. an s3:// URI) and loaded from
    there, the way a cluster reads a model from the object store.
    """
    if checkpoint_uri is None:
        return BackboneConfig(model=MODEL_NAME, pretrained=str(CHECKPOINT_PATH))
    storage.write_bytes(checkpoint_uri, CHECKPOINT_PATH.read_bytes())
    return BackboneConfig(model=MODEL_NAME, pretrained=checkpoint_uri)


def _local_checkpoint(pretrained: str | None) -> str | None:
    """A checkpoint URI as a local file open_clip can read; tags (e.g. 'openai') pass through."""
    if pretrained is None or not storage.is_s3(pretrained):
        return pretrained and storage.local_path(pretrained)
    key = hashlib.sha256(f"{pretrained}@{storage.version(pretrained)}".encode()).hexdigest()[:16]
    target = storage.cache_dir() / "checkpoints" / key / Path(pretrained).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.write_bytes(str(target), storage.read_bytes(pretrained))
    return str(target)


def _model_config(config: BackboneConfig) -> dict:
    model_config = open_clip.get_model_config(config.model)
    if model_config is None:
        raise ValueError(
            f"unknown open_clip model {config.model!r}; known: {', '.join(open_clip.list_models())}"
        )
    return model_config


def image_preprocessor(config: BackboneConfig):
    """The model's eval-time image transform (PIL -> [3, H, W]) without building the model."""
    model_config = _model_config(config)
    preprocess = dict(model_config.get("preprocess_cfg", {}))
    checkpoint = _local_checkpoint(config.pretrained)
    if config.pretrained and not (checkpoint and Path(checkpoint).exists()):
        preprocess.update(open_clip.get_pretrained_cfg(config.model, config.pretrained))
    return open_clip.image_transform(
        model_config["vision_cfg"]["image_size"],
        is_train=False,
        mean=preprocess.get("mean"),
        std=preprocess.get("std"),
        resize_mode=preprocess.get("resize_mode"),
        interpolation=preprocess.get("interpolation"),
    )


def _weightless(record: logging.LogRecord) -> bool:
    # open_clip warns that a model without pretrained weights is random: a meta model has no weights at all
    return "No pretrained weights loaded" not in record.getMessage()


def meta_model(config: BackboneConfig) -> torch.nn.Module:
    _model_config(config)
    root = logging.getLogger()
    root.addFilter(_weightless)
    try:
        with torch.device("meta"):
            return open_clip.create_model(config.model, pretrained=None, device="meta")
    finally:
        root.removeFilter(_weightless)


def load_model(config: BackboneConfig, device: torch.device) -> torch.nn.Module:
    checkpoint = _local_checkpoint(config.pretrained)
    model, _, _ = open_clip.create_model_and_transforms(config.model, pretrained=checkpoint, device=device)
    return model


def load_tokenizer(config: BackboneConfig):
    return open_clip.get_tokenizer(config.model)


def _text_tower(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(module-name prefix, module) of the text tower: the CLIP itself, or `text` in CustomTextCLIP."""
    return ("text.", model.text) if hasattr(model, "text") else ("", model)


def hook_points(model: torch.nn.Module) -> dict[str, str]:
    """Each tower's block outputs, its final norm and its embedding."""
    names = dict(model.named_modules())
    prefix, _ = _text_tower(model)
    points = {}
    for tower, modality, final_norm, embedding in (
        ("visual.", "image", "visual.ln_post", "visual"),
        (prefix, "text", f"{prefix}ln_final", "text"),
    ):
        blocks = f"{tower}transformer.resblocks."
        n_blocks = sum(1 for name in names if name.startswith(blocks) and "." not in name[len(blocks) :])
        points |= {f"{blocks}{i}": modality for i in range(n_blocks)}
        points |= {name: modality for name in (final_norm,) if name in names}
        points[embedding] = modality
    return points


def required_inputs(hook_point: str, modality: str) -> set[str]:
    return {"pixels"} if modality == "image" else {"texts"}


def hook_width(model: torch.nn.Module, hook_point: str) -> int:
    if hook_point in ("visual", "text"):  # both towers project into the one embedding space
        return model.visual.output_dim
    _, text_tower = _text_tower(model)
    return (model.visual if hook_point.startswith("visual.") else text_tower).transformer.width


def _text_positions(model: torch.nn.Module, tokens_bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(real_bt, cls_b) of tokenized captions: the position the model pools, as `text_global_pool`
    picks it, and the tokens up to it (causal attention: what follows is padding)."""
    _, tower = _text_tower(model)
    pool_type = getattr(tower, "text_pool_type", None) or tower.pool_type
    eos_id = getattr(tower, "text_eos_id", None) or getattr(tower, "eos_id", None)
    n_items, n_tokens = tokens_bt.shape
    if pool_type == "argmax":
        cls_b = tokens_bt.argmax(dim=-1)
    elif pool_type == "eos":
        cls_b = (tokens_bt == eos_id).int().argmax(dim=-1)
    else:  # first / last / none attend over the whole context: every position is input
        cls_b = torch.full((n_items,), 0 if pool_type == "first" else n_tokens - 1)
        return torch.ones_like(tokens_bt, dtype=torch.bool), cls_b
    return torch.arange(n_tokens)[None] <= cls_b[:, None].cpu(), cls_b


def _batch_first(model: torch.nn.Module, name: str, output: torch.Tensor) -> torch.Tensor:
    """An output as [B, T, d]: towers built with batch_first=False run their blocks as [T, B, d]."""
    if ".resblocks." not in name:
        return output
    transformer = model.get_submodule(name.rsplit(".resblocks.", 1)[0])
    return output if getattr(transformer, "batch_first", True) else output.transpose(0, 1)


def hook_outputs(backbone, hook_points: list[str], pixels, texts) -> dict[str, HookOutput]:
    """Each requested hook's output: one forward of each tower the hooks need."""
    model, modality = backbone.model, backbone.hook_points
    image_hooks = [name for name in hook_points if modality[name] == "image"]
    text_hooks = [name for name in hook_points if modality[name] == "text"]
    outputs: dict[str, HookOutput] = {}
    if image_hooks:
        pixels = pixels.to(backbone.device)
        modules = [name for name in image_hooks if name != "visual"]
        captured, embedding_bd = run_with_hooks(model, modules, lambda: model.encode_image(pixels))
        outputs |= {name: HookOutput(_batch_first(model, name, x)) for name, x in captured.items()}
        outputs |= {"visual": HookOutput(embedding_bd)} if "visual" in image_hooks else {}
    if text_hooks:
        tokens_bt = backbone.tokenizer(texts).to(backbone.device)
        real_bt, cls_b = _text_positions(model, tokens_bt)
        modules = [name for name in text_hooks if name != "text"]
        captured, embedding_bd = run_with_hooks(model, modules, lambda: model.encode_text(tokens_bt))
        outputs |= {
            name: HookOutput(_batch_first(model, name, x), real_bt, cls_b) for name, x in captured.items()
        }
        outputs |= {"text": HookOutput(embedding_bd)} if "text" in text_hooks else {}
    return outputs
