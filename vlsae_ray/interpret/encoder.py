"""Images to SAE latents: a backbone's activation at a hook point, encoded by a trained SAE."""

from __future__ import annotations

import io

import torch
from PIL import Image, UnidentifiedImageError

from vlsae_ray.backbones import hook_dims, load_backbone, valid_hook_points
from vlsae_ray.config import ServeConfig
from vlsae_ray.sae import SparseAutoencoder


class NotAnImageError(ValueError):
    """Uploaded bytes that no image decoder can read."""


def decode_image(data: bytes) -> Image.Image:
    if not data:
        raise NotAnImageError("the upload is empty; send an image file (PNG, JPEG, ...)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise NotAnImageError(
            "the upload is not an image in a format this server reads (PNG, JPEG, ...)"
        ) from None
    except (OSError, ValueError) as error:  # a known format, but truncated or corrupt
        raise NotAnImageError(f"the upload is not an image this server can read ({error})") from None
    return image.convert("RGB")


class ImageEncoder:
    """Backbone + SAE on `device` (default: `backbone.device`): an image's top SAE latents."""

    def __init__(self, config: ServeConfig, device: torch.device | None = None):
        self.config = config
        d = hook_dims(config.backbone, [config.hook_point])[config.hook_point]
        reads = valid_hook_points(config.backbone)[config.hook_point]
        if config.token.mode not in ("cls", "mean") or reads != "image":
            raise ValueError(
                f"the encoder gives one vector per image: hook point {config.hook_point!r} must read images "
                f"and token must be cls or mean (not {str(config.token)!r})"
            )
        self.backbone = load_backbone(config.backbone, device)
        self.sae = SparseAutoencoder.load(config.sae, device=self.backbone.device).eval()
        if d != self.sae.config.d_in:
            raise ValueError(
                f"hook point {config.hook_point!r} gives d={d} but the SAE at {config.sae!r} takes "
                f"d_in={self.sae.config.d_in}"
            )

    @torch.no_grad()
    def top_latents(self, images: list[Image.Image], k: int) -> list[list[tuple[int, float]]]:
        """For each image, its k largest active latents as (latent, activation), largest first."""
        hook = self.config.hook_point
        ids = [str(i) for i in range(len(images))]  # no random draw here: ids only label the rows
        rows = self.backbone.activations(
            [hook], pixels=self.backbone.pixels(images), item_ids=ids, token=self.config.token
        )
        x_bd = rows[hook].values
        z_bf = self.sae.encode(x_bd.to(self.backbone.device)).cpu()
        values_bk, latents_bk = z_bf.topk(min(k, z_bf.shape[1]), dim=-1)
        return [
            [(int(j), float(v)) for j, v in zip(latents, values, strict=True) if v > 0]
            for latents, values in zip(latents_bk.tolist(), values_bk.tolist(), strict=True)
        ]
