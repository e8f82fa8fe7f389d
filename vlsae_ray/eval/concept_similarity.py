"""VL-SAE concept quality: intra- and inter-concept similarity of images and texts.

Our reading of the VL-SAE paper's evaluation (Shen et al. 2025, arXiv 2510.21323, sec. 4): a good
concept gathers representations that are alike (high intra-concept similarity) and different from
other concepts' (low inter-concept similarity), in each modality and across them. For concept j,
V_j and T_j are the unit vectors of the representations of its top-k images and top-k captions (the
rows the SAE encodes, e.g. CLIP's image and text embeddings), with means μ^V_j and μ^T_j:

    intra image  = mean_j  mean_{a<b in V_j} cos(v_a, v_b)
    inter image  = mean_{i≠j}  mean_{a in V_i, b in V_j} cos(v_a, v_b)  = mean_{i≠j} μ^V_i · μ^V_j
    (text likewise)
    intra image-text = mean_j μ^V_j · μ^T_j          inter image-text = mean_{i≠j} μ^V_i · μ^T_j

Concepts with fewer than two top rows in either modality are left out.
"""

from __future__ import annotations

import math

import torch


def _unit(x_md: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x_md.double(), dim=-1)


def _pair_mean(unit_md: torch.Tensor) -> float:
    """Mean cosine over the pairs a < b of unit rows: (||Σ v||² - m) / (m (m - 1))."""
    m = unit_md.shape[0]
    return float((unit_md.sum(0).pow(2).sum() - m) / (m * (m - 1)))


def concept_similarity(images: list[torch.Tensor], texts: list[torch.Tensor]) -> dict[str, float]:
    """`images[j]`, `texts[j]`: [m_j, d] representations of concept j's top images and captions."""
    kept = [(v, t) for v, t in zip(images, texts, strict=True) if len(v) >= 2 and len(t) >= 2]
    if len(kept) < 2:
        return {"concepts": len(kept), **dict.fromkeys(_KEYS, math.nan)}
    unit = [(_unit(v), _unit(t)) for v, t in kept]
    mean_v_cd = torch.stack([v.mean(0) for v, _ in unit])
    mean_t_cd = torch.stack([t.mean(0) for _, t in unit])
    c = len(unit)

    def inter(a_cd: torch.Tensor, b_cd: torch.Tensor) -> float:
        return float(((a_cd.sum(0) @ b_cd.sum(0)) - (a_cd * b_cd).sum()) / (c * (c - 1)))

    return {
        "concepts": c,
        "intra_image": sum(_pair_mean(v) for v, _ in unit) / c,
        "inter_image": inter(mean_v_cd, mean_v_cd),
        "intra_text": sum(_pair_mean(t) for _, t in unit) / c,
        "inter_text": inter(mean_t_cd, mean_t_cd),
        "intra_image_text": float((mean_v_cd * mean_t_cd).sum(-1).mean()),
        "inter_image_text": inter(mean_v_cd, mean_t_cd),
    }


_KEYS = ("intra_image", "inter_image", "intra_text", "inter_text", "intra_image_text", "inter_image_text")
