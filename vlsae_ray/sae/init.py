"""Initialisation from data: the input scale, the geometric median of a sample, the dictionary."""

from __future__ import annotations

import torch
from torch import nn


def input_scale(sample_nd: torch.Tensor) -> float:
    """sqrt(mean ||x||^2) over the sample, so that x / scale has mean squared norm 1."""
    scale = sample_nd.float().pow(2).sum(-1).mean().sqrt().item()
    if not scale > 0:
        raise ValueError("the init sample is all zeros: cannot derive an input scale from it")
    return scale


def geometric_median(points_nd: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to `points_nd`, by Weiszfeld iterations.

    Weiszfeld (1937): y <- sum_i w_i x_i / sum_i w_i with w_i = 1 / ||x_i - y||, started at the
    mean. Distances are floored at a tiny epsilon so an iterate landing on a data point stays finite.
    """
    points_nd = points_nd.double()
    median_d = points_nd.mean(0)
    for _ in range(max_iter):
        weights_n = 1.0 / (points_nd - median_d).norm(dim=-1).clamp_min(1e-12)
        update_d = (weights_n[:, None] * points_nd).sum(0) / weights_n.sum()
        shift = (update_d - median_d).norm()
        median_d = update_d
        if shift <= tol * median_d.norm().clamp_min(1.0):
            break
    return median_d.float()


def distinct_rows(sample_nd: torch.Tensor) -> torch.Tensor:
    """The rows of `sample_nd` without repeats, each at its first occurrence, in sample order."""
    _, inverse_n = torch.unique(sample_nd, dim=0, return_inverse=True)
    n = len(sample_nd)
    first_u = torch.full((int(inverse_n.max()) + 1,), n, dtype=torch.long, device=sample_nd.device)
    first_u.scatter_reduce_(0, inverse_n, torch.arange(n, device=sample_nd.device), "amin")
    return sample_nd[first_u.sort().values]


@torch.no_grad()
def init_dictionary_from_data(sae: nn.Module, sample_nd: torch.Tensor, *, chunk: int = 4096) -> None:
    """Decoder columns at centred, normalised sample rows; the encoder their transpose, scaled.

    Run after `init_from_data` (input scale and b_dec set), and only for SAEs with
    `dictionary_from_data` (the TopK family). Latent j starts at the sample's j-th distinct row:
    each column then points at a mixture of the few features that row holds, rather than at none,
    so a short run starts learning features at once instead of first rotating random directions.
    Repeated rows are skipped: identical latents tie in every top-k, and a tie may be broken one way
    by one process and another by latent shards. A sample with fewer distinct rows than the SAE has
    latents leaves the latents past them at their random initial directions (the trainers draw
    8192 rows: wider SAEs start partly random; their encoder gain is fitted all the same).

    The encoder's scale g is then fitted by least squares, g = <c, r> / <r, r> over the sample
    (c = x - b_dec, r its reconstruction at g = 1): the TopK selection does not depend on g
    (b_enc = 0), and without it the first steps go into undoing an initial reconstruction that
    overshoots x (FVU > 1).

    `sae` may be a latent shard (`parallel.LatentShardedSAE`: its `local` SAE holds the latents
    `offset`.. of the full SAE and its forward reconstructs with every shard), so each latent gets
    the row and the gain the unsharded SAE gives it.
    """
    local = getattr(sae, "local", sae)
    if not local.dictionary_from_data:
        return
    offset, n_local = getattr(sae, "offset", 0), local.config.n_latents
    rows_nd = distinct_rows(sample_nd).to(local.b_dec_d.device, torch.float32)[offset : offset + n_local]
    if len(rows_nd):
        centred_nd = rows_nd / local.input_scale - local.b_dec_d
        columns_nd = centred_nd / centred_nd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        local.W_dec_fd[: len(columns_nd)] = columns_nd
        local.W_enc_fd[: len(columns_nd)] = columns_nd
    was_training = sae.training
    sae.train()  # the training selection (BatchTopK's batch top-k); no gradients: θ stays untouched
    dot = norm = 0.0
    b_dec_d = local.input_scale * local.b_dec_d  # in raw units, as the forward takes x and returns x_hat
    for x_bd in sample_nd.to(local.b_dec_d.device, torch.float32).split(chunk):
        reconstruction_bd = sae(x_bd, sparse_latents=True)[0] - b_dec_d
        dot += float(((x_bd - b_dec_d) * reconstruction_bd).sum())
        norm += float(reconstruction_bd.pow(2).sum())
    sae.train(was_training)
    if dot > 0 and norm > 0:
        local.W_enc_fd *= dot / norm
