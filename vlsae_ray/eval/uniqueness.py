"""Uniqueness of SAE latents: how much their top-activating image sets overlap.

Two latents whose top images are the same images explain the same thing twice. For latent j with
top-k set T_j (its k highest-activating images where it fires), its overlap is the largest Jaccard
index |T_i ∩ T_j| / |T_i ∪ T_j| with any other latent i. We report the mean over latents of that
maximum, and uniqueness = 1 - mean max overlap. This is the mean max cosine similarity (MMCS) of
Sharkey, Braun & Millidge 2022 ("Taking features out of superposition with sparse autoencoders"),
taken within one dictionary and with the Jaccard index of top-activating example sets (the unit by
which latents are read, Bricken et al. 2023, "Towards Monosemanticity") in place of the cosine of
decoder directions. We also report the fraction of latents whose top set equals another latent's
(duplicates). Latents that never fire have no set and are left out.

Cost: a sparse [F, R] x [R, F] product over the R distinct top rows, so O(F k^2)-ish, never F^2 memory.
"""

from __future__ import annotations

import math

import torch


def top_set_overlap(sets: list[list[int]]) -> dict:
    """Overlap of each latent's top set (a list of row indices) with the others'.

    Returns max_jaccard [F] (NaN: no set), mean_max_jaccard, uniqueness, duplicate_fraction and
    latents (how many have a set).
    """
    n_latents = len(sets)
    latent_n = torch.tensor([j for j, rows in enumerate(sets) for _ in rows], dtype=torch.long)
    rows_n = torch.tensor([row for rows in sets for row in rows], dtype=torch.long)
    size_f = torch.tensor([len(set(rows)) for rows in sets], dtype=torch.float64)
    max_jaccard_f = torch.full((n_latents,), math.nan, dtype=torch.float64)
    max_jaccard_f[size_f > 0] = 0.0
    if rows_n.numel():
        column_n = torch.unique(rows_n, return_inverse=True)[1]
        incidence = torch.sparse_coo_tensor(
            torch.stack([latent_n, column_n]), torch.ones(len(rows_n), dtype=torch.float64),
            (n_latents, int(column_n.max()) + 1), check_invariants=True,
        ).coalesce()  # fmt: skip
        shared = torch.sparse.mm(incidence, incidence.t()).coalesce()
        (i, j), intersection = shared.indices(), shared.values()
        other = i != j
        i, j, intersection = i[other], j[other], intersection[other]
        jaccard = intersection / (size_f[i] + size_f[j] - intersection)
        max_jaccard_f.scatter_reduce_(0, i, jaccard, reduce="amax")
    live_f = size_f > 0
    live = int(live_f.sum())
    mean_max = float(max_jaccard_f[live_f].mean()) if live else math.nan
    return {
        "max_jaccard": max_jaccard_f,
        "mean_max_jaccard": mean_max,
        "uniqueness": 1 - mean_max if live else math.nan,
        "duplicate_fraction": float((max_jaccard_f[live_f] == 1.0).double().mean()) if live else math.nan,
        "latents": live,
    }
