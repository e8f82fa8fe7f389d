"""open_clip backbones: loading through open_clip's own factory, and activations at hook points.

A hook point is the name of a module in the model (`model.named_modules()`); its activation is
that module's output. `visual.transformer.resblocks.{i}` is the residual stream after vision
block i (a [B, tokens, d] tensor, of which `token: cls` keeps token 0); `visual` is the image
embedding after the projection ([B, embed_dim]).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import open_clip
import torch
from PIL import Image

from vlsae_ray import storage
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
    cache = Path(os.environ.get("VLSAE_CACHE", Path.home() / ".cache" / "vlsae")) / "checkpoints"
    key = hashlib.sha256(f"{pretrained}@{storage.version(pretrained)}".encode()).hexdigest()[:16]
    target = cache / key / Path(pretrained).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.write_bytes(str(target), storage.read_bytes(pretrained))
    return str(target)


def image_preprocessor(config: BackboneConfig):
    """The model's eval-time image transform (PIL -> [3, H, W]) without building the model.

    CPU preprocessing tasks use this so only the model actors hold weights.
    """
    model_config = open_clip.get_model_config(config.model)
    if model_config is None:
        raise ValueError(
            f"unknown open_clip model {config.model!r}; known: {', '.join(open_clip.list_models())}"
        )
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("backbone.device is 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    return torch.device(device)


def valid_hook_points(model: torch.nn.Module) -> list[str]:
    """Names worth hooking: each vision block's output, the final norm and the image embedding."""
    blocks = [name for name, _ in model.named_modules() if name.startswith("visual.transformer.resblocks.")]
    return [*[name for name in blocks if name.count(".") == 3], "visual.ln_post", "visual"]


def hooked_image_forward(
    model: torch.nn.Module, pixels_bchw: torch.Tensor, hook_points: list[str], token: str = "cls"
) -> dict[str, torch.Tensor]:
    """{hook point: [B, d] activation} from one forward pass of the image tower."""
    valid = valid_hook_points(model)
    for name in hook_points:
        if name not in valid:
            raise ValueError(
                f"hook point {name!r} is not in this model; valid hook points: {', '.join(valid)}"
            )
    modules = dict(model.named_modules())
    batch_first = getattr(model.visual.transformer, "batch_first", True)
    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(_module, _inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            if output.ndim == 3:  # a token sequence: keep the chosen token
                output = output if batch_first else output.transpose(0, 1)
                output = output[:, 0] if token == "cls" else output
            captured[name] = output

        return hook

    handles = [modules[name].register_forward_hook(capture(name)) for name in hook_points]
    try:
        model.encode_image(pixels_bchw)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def hook_dims(config: BackboneConfig, hook_points: list[str], token: str = "cls") -> dict[str, int]:
    """Validate hook point names and find each one's width, with no weights (a meta-device forward).

    Costs a fraction of a second even for ViT-L, so jobs check their config before any work.
    """
    image_size = image_preprocessor(config).transforms[0].size
    size = image_size if isinstance(image_size, int) else image_size[0]
    with torch.device("meta"):
        model = open_clip.create_model(config.model, pretrained=None, device="meta")
        outputs = hooked_image_forward(model, torch.zeros(1, 3, size, size), hook_points, token)
    return {name: output.shape[-1] for name, output in outputs.items()}


class Backbone:
    """An open_clip model loaded by open_clip's own factory, with activations at named hook points."""

    def __init__(self, config: BackboneConfig):
        self.config = config
        self.device = resolve_device(config.device)
        checkpoint = _local_checkpoint(config.pretrained)
        model, _, _ = open_clip.create_model_and_transforms(
            config.model, pretrained=checkpoint, device=self.device
        )
        self.model = model.eval()
        self.preprocess = image_preprocessor(config)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images])

    @torch.no_grad()
    def activations(
        self, pixels_bchw: torch.Tensor, hook_points: list[str], token: str = "cls"
    ) -> dict[str, torch.Tensor]:
        """{hook point: [B, d] float32 activations on the CPU} from one forward pass."""
        outputs = hooked_image_forward(self.model, pixels_bchw.to(self.device), hook_points, token)
        return {name: output.float().cpu() for name, output in outputs.items()}
