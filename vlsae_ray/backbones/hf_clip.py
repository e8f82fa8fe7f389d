"""transformers CLIP backbones: a `CLIPModel` folder made by `save_pretrained`, read at hook points.

The folder holds the model, its image processor and its tokenizer, as `save_pretrained` writes
them; nothing is fetched from a hub. It is a local path, file:// or s3:// URI. An s3:// folder is
copied into this machine's cache once per version (`storage.local_folder`): without its weight
files for what needs none (hook validation on the driver, preprocessing tasks), whole for
`load_model`. Hook points are module names of the `CLIPModel`:
`vision_model.encoder.layers.{i}` (the residual stream after vision layer i, [B, tokens, d]),
`vision_model.post_layernorm` (which transformers applies to the class token only: [B, d]),
`visual_projection` (the image embedding), and `text_model.encoder.layers.{i}`,
`text_model.final_layer_norm` (over the token sequence), `text_projection` (the text embedding).
A caption's real tokens are those its attention mask keeps; its 'cls' token is the EOS position
the model pools.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image

from vlsae_ray import storage
from vlsae_ray.backbones.hooks import run_with_hooks
from vlsae_ray.backbones.rows import HookOutput
from vlsae_ray.config import BackboneConfig

# The files `from_pretrained` reads weights from; the config, processor and tokenizer are the rest.
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def model_folder(config: BackboneConfig, weights: bool = False) -> str:
    """The local folder of a save_pretrained model, checked to be one; an s3:// folder is copied
    into this machine's cache, with its weight files only if `weights`."""
    folder = storage.local_folder(config.model, skip_suffixes=() if weights else WEIGHT_SUFFIXES)
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(
            f"backbone.model {config.model!r} is not a save_pretrained folder (no config.json there); "
            "save the model with model.save_pretrained(folder) and its processor and tokenizer beside it"
        )
    return folder


def _pixels(processor, image: Image.Image) -> torch.Tensor:
    return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def image_preprocessor(config: BackboneConfig):
    """The image processor saved with the model, as a PIL -> [3, H, W] function."""
    from transformers import AutoImageProcessor

    return functools.partial(_pixels, AutoImageProcessor.from_pretrained(model_folder(config)))


def pretrained_config(config: BackboneConfig, model_type: str, fix: str):
    """The transformers config of the model folder, checked to be of `model_type` (else: `fix`)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model_folder(config))
    if model_config.model_type != model_type:
        raise ValueError(
            f"backbone.model {config.model!r} holds a {model_config.model_type!r} model, not {model_type!r}; "
            f"{fix}"
        )
    return model_config


def _clip_config(config: BackboneConfig):
    return pretrained_config(
        config, "clip", "use library: llava for LLaVA, or a folder saved from a transformers CLIPModel"
    )


def meta_model(config: BackboneConfig) -> torch.nn.Module:
    from transformers import CLIPModel

    model_config = _clip_config(config)
    with torch.device("meta"):
        return CLIPModel(model_config)


def load_model(config: BackboneConfig, device: torch.device) -> torch.nn.Module:
    from transformers import CLIPModel

    model_config = _clip_config(config)  # checked once, and handed on instead of parsed again
    model = CLIPModel.from_pretrained(
        model_folder(config, weights=True), config=model_config, local_files_only=True
    )
    return model.to(device)


def load_tokenizer(config: BackboneConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder(config))


def hook_points(model: torch.nn.Module) -> dict[str, str]:
    points = {}
    for tower, modality, final_norm, projection in (
        ("vision_model", "image", "post_layernorm", "visual_projection"),
        ("text_model", "text", "final_layer_norm", "text_projection"),
    ):
        n_layers = len(model.get_submodule(tower).encoder.layers)
        points |= {f"{tower}.encoder.layers.{i}": modality for i in range(n_layers)}
        points |= {f"{tower}.{final_norm}": modality, projection: modality}
    return points


def required_inputs(hook_point: str, modality: str) -> set[str]:
    return {"pixels"} if modality == "image" else {"texts"}


def hook_width(model: torch.nn.Module, hook_point: str) -> int:
    if hook_point.endswith("_projection"):
        return model.config.projection_dim
    tower = model.config.vision_config if hook_point.startswith("vision_model.") else model.config.text_config
    return tower.hidden_size


def eos_positions(text_model: torch.nn.Module, input_ids_bt: torch.Tensor) -> torch.Tensor:
    """[B] the position CLIPTextModel pools, by its own rule (see its forward)."""
    if text_model.eos_token_id == 2:  # configs from before transformers PR #24773: EOT is the largest id
        return input_ids_bt.argmax(dim=-1)
    return (input_ids_bt == text_model.eos_token_id).int().argmax(dim=-1)


def hook_outputs(backbone, hook_points: list[str], pixels, texts) -> dict[str, HookOutput]:
    """Each requested hook's output: one forward of each tower the hooks need."""
    model = backbone.model
    image_hooks = [name for name in hook_points if backbone.hook_points[name] == "image"]
    text_hooks = [name for name in hook_points if backbone.hook_points[name] == "text"]
    outputs: dict[str, HookOutput] = {}
    if image_hooks:
        pixels = pixels.to(backbone.device, model.vision_model.dtype)
        captured, _ = run_with_hooks(
            model, image_hooks, lambda: model.get_image_features(pixel_values=pixels)
        )
        outputs |= {name: HookOutput(captured[name]) for name in image_hooks}
    if text_hooks:
        max_length = model.config.text_config.max_position_embeddings
        tokens = backbone.tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(backbone.device)
        captured, _ = run_with_hooks(
            model,
            text_hooks,
            lambda: model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask),
        )
        real_bt = tokens.attention_mask.bool()
        cls_b = eos_positions(model.text_model, tokens.input_ids)
        outputs |= {name: HookOutput(captured[name], real_bt, cls_b) for name in text_hooks}
    return outputs
