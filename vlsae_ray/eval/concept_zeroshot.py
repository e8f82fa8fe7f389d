"""Concept-level zero-shot classification with a VL-SAE (the VL-SAE paper's Eq. 10).

A CLIP classifies an image by the cosine of its embedding v with each class's text embedding t_c.
The VL-SAE adds a concept-level similarity, the cosine of the two sides' latents z = enc(.) (one
shared encoder, so a latent is one concept on either side):

    s_c = cos(v, t_c) + alpha * cos(enc(v), enc(t_c))

We use this additive form: alpha = 0 is the plain classifier exactly. The authors' code has no
evaluation script, and the convex form (1 - a) cos(v, t_c) + a cos(z_v, z_c) some readers infer
ranks the classes exactly as the additive one with alpha = a / (1 - a), so only the scale of alpha
differs. t_c is the class's prompt-ensembled embedding (the normalised mean of its prompts'
embeddings); its latents are the VL-SAE's encoding of it. alpha is chosen per task (the paper's
per-dataset alpha, Table A6) as the one of a grid with the best accuracy on validation images
disjoint from the test images; ties go to the smallest alpha, so it falls back to plain CLIP
when the concepts do not help.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlsae_ray.sae import SparseAutoencoder


@torch.no_grad()
def concept_level_similarity(
    sae: SparseAutoencoder, image_nd: torch.Tensor, class_cd: torch.Tensor
) -> torch.Tensor:
    """[N, C] cosines of the images' latents with the classes' latents (embeddings in)."""
    weight = sae.b_dec_d
    z_image = F.normalize(sae.encode(image_nd.to(weight)).float(), dim=-1)
    z_class = F.normalize(sae.encode(class_cd.to(weight)).float(), dim=-1)
    return (z_image @ z_class.T).cpu()


def embedding_level_similarity(image_nd: torch.Tensor, class_cd: torch.Tensor) -> torch.Tensor:
    """[N, C] CLIP's zero-shot logits: cosines of the raw image embeddings with the unit class
    embeddings (normalised as `encode_image(normalize=True)` does, so the scores are CLIP's own)."""
    return F.normalize(image_nd, dim=-1) @ class_cd.T


def accuracy(scores_nc: torch.Tensor, truth_n: torch.Tensor) -> float:
    """Share of rows whose highest-scoring class is the true class index."""
    return int((scores_nc.argmax(-1) == truth_n).sum()) / len(truth_n)  # exact, as a float64


def choose_alpha(
    embedding_nc: torch.Tensor, concept_nc: torch.Tensor, truth_n: torch.Tensor, alphas: Sequence[float]
) -> tuple[float, dict[float, float]]:
    """(the alpha with the best accuracy, the smallest among ties; the accuracy of every alpha)."""
    curve = {alpha: accuracy(embedding_nc + alpha * concept_nc, truth_n) for alpha in sorted(alphas)}
    best = max(curve.values())
    return min(alpha for alpha, value in curve.items() if value == best), curve
