"""Explaining an image-caption pair by its concepts (the VL-SAE paper's use of one concept set).

Both embeddings are encoded by the same SAE; a latent active (> 0) in both is a concept the pair
shares, one active in one only is what that side has and the other lacks. With a VL-SAE the two
encodings go through one shared encoder, so a latent means the same concept on either side. Names
and confidences come from the label job's catalog (`catalog_names`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa
import torch

from vlsae_ray.sae import SparseAutoencoder


@dataclass(frozen=True)
class PairConcept:
    latent: int
    name: str | None
    confidence: float | None
    image_activation: float
    text_activation: float


@dataclass(frozen=True)
class PairExplanation:
    shared: list[PairConcept]  # active on both sides
    image_only: list[PairConcept]
    text_only: list[PairConcept]


def catalog_names(catalog_table: pa.Table) -> dict[int, dict]:
    """{latent: {"name", "confidence"}} from a concept catalog (`vlsae_ray.interpret.catalog`)."""
    rows = catalog_table.select(["latent", "name", "confidence"]).to_pylist()
    return {row["latent"]: {"name": row["name"], "confidence": row["confidence"]} for row in rows}


@torch.no_grad()
def explain_pair(
    sae: SparseAutoencoder,
    image_x_d: torch.Tensor,
    text_x_d: torch.Tensor,
    names: Mapping[int, Mapping] | None = None,
    top_k: int = 10,
) -> PairExplanation:
    """The shared, image-only and text-only concepts of one image and one caption embedding ([d]).

    Each list is sorted by the larger of the two activations, descending, and holds at most
    `top_k` concepts. Each side is encoded on its own, as `sae.encode` of a one-row batch, so a
    batch-level SAE (BatchTopK) gives each side the latents it would give it alone.
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1")
    d = sae.config.d_in
    for side, x in (("image", image_x_d), ("text", text_x_d)):
        if x.shape != (d,):
            raise ValueError(f"{side}_x_d has shape {tuple(x.shape)}; expected [{d}], one embedding")
    weight = sae.b_dec_d
    z_image = sae.encode(image_x_d.to(weight)[None])[0].float().cpu()
    z_text = sae.encode(text_x_d.to(weight)[None])[0].float().cpu()
    names = names or {}

    def concepts(mask: torch.Tensor) -> list[PairConcept]:
        latents = mask.nonzero().flatten().tolist()
        # largest activation first; the latent index breaks ties so the order is reproducible
        latents.sort(key=lambda j: (-max(float(z_image[j]), float(z_text[j])), j))
        out = []
        for j in latents[:top_k]:
            entry = names.get(j) or {}
            out.append(
                PairConcept(
                    latent=j,
                    name=entry.get("name"),
                    confidence=entry.get("confidence"),
                    image_activation=float(z_image[j]),
                    text_activation=float(z_text[j]),
                )
            )
        return out

    on_image, on_text = z_image > 0, z_text > 0
    return PairExplanation(
        shared=concepts(on_image & on_text),
        image_only=concepts(on_image & ~on_text),
        text_only=concepts(on_text & ~on_image),
    )
