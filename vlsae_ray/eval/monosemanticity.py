"""The Monosemanticity Score (MS) of Pach et al. 2025 (arXiv 2504.02821, sec. 3.2).

For neuron k with activations a_n over N images, min-max normalised over the images
(ã_n = (a_n - min a) / (max a - min a)), and image embeddings e_n with cosine similarity s_nm:

    MS_k = sum_{n<m} ã_n ã_m s_nm / sum_{n<m} ã_n ã_m

The paper's reference is a double loop over image pairs. With unit embeddings the pair sums
factorise (s_nn = 1):

    sum_{n<m} ã_n ã_m s_nm = (||sum_n ã_n e_n||^2 - sum_n ã_n^2) / 2
    sum_{n<m} ã_n ã_m      = ((sum_n ã_n)^2    - sum_n ã_n^2) / 2

so the score costs O(N F D) in one pass over the images (after a pass for the min and max). For
SAE latents (`SparseLatents`, k of F active per image) the accumulator never builds the dense
[N, F] matrix: an inactive latent's normalised value is the same constant c = -min / (max - min)
on every image where it is off, so each sum is c times the all-image sum plus the active entries'
differences from c, O(N k D).
A neuron that never varies (max = min) has no defined score: NaN. So does one whose normalised
activation is nonzero on a single image (no weighted pair: 0 / 0).
"""

from __future__ import annotations

import torch

from vlsae_ray.sae.kernels import SparseLatents


class MonosemanticityAccumulator:
    """The two-pass streaming form: `observe` every chunk (min/max), then `accumulate` every chunk.

    Chunks are ([n, F] activations or `SparseLatents`, [n, D] embeddings) over the same images in
    any order; the result does not depend on how the images are chunked. For a distributed pass, each task
    fills its own accumulator and the reduce `merge`s them (`vlsae_ray.eval.dataset_pass`).
    """

    def __init__(self, n_neurons: int, embedding_dim: int):
        self.min_f = torch.full((n_neurons,), float("inf"), dtype=torch.float64)
        self.max_f = torch.full((n_neurons,), float("-inf"), dtype=torch.float64)
        self.weighted_fe = torch.zeros(n_neurons, embedding_dim, dtype=torch.float64)
        self.sum_f = torch.zeros(n_neurons, dtype=torch.float64)
        self.sum_squares_f = torch.zeros(n_neurons, dtype=torch.float64)

    def observe(self, activations: torch.Tensor | SparseLatents) -> None:
        if isinstance(activations, SparseLatents):
            min_f, max_f = _sparse_min_max(activations)
        else:
            min_f, max_f = activations.double().aminmax(dim=0)
        self.min_f = torch.minimum(self.min_f, min_f)
        self.max_f = torch.maximum(self.max_f, max_f)

    @classmethod
    def from_bounds(
        cls, min_f: torch.Tensor, max_f: torch.Tensor, embedding_dim: int
    ) -> MonosemanticityAccumulator:
        """An accumulator whose first pass is done elsewhere (a map task of the sums pass)."""
        accumulator = cls(min_f.shape[0], embedding_dim)
        accumulator.min_f, accumulator.max_f = min_f.double().clone(), max_f.double().clone()
        return accumulator

    def merge(self, other: MonosemanticityAccumulator) -> None:
        """Add another chunk's partial state: min/max of the first pass, sums of the second.

        The reduce step of the map-reduce: any split of the images into chunks, merged in any
        order, gives the same state as one accumulator over all of them.
        """
        self.min_f = torch.minimum(self.min_f, other.min_f)
        self.max_f = torch.maximum(self.max_f, other.max_f)
        self.weighted_fe += other.weighted_fe
        self.sum_f += other.sum_f
        self.sum_squares_f += other.sum_squares_f

    def accumulate(self, activations: torch.Tensor | SparseLatents, embeddings_nd: torch.Tensor) -> None:
        unit_nd = torch.nn.functional.normalize(embeddings_nd.double(), dim=-1)
        span_f = self.max_f - self.min_f
        span_f = torch.where(span_f > 0, span_f, 1.0)
        if isinstance(activations, SparseLatents):
            self._accumulate_sparse(activations, unit_nd, span_f)
            return
        normalised_nf = (activations.double() - self.min_f) / span_f
        self.weighted_fe += normalised_nf.T @ unit_nd
        self.sum_f += normalised_nf.sum(0)
        self.sum_squares_f += normalised_nf.pow(2).sum(0)

    def _accumulate_sparse(self, z: SparseLatents, unit_nd: torch.Tensor, span_f: torch.Tensor) -> None:
        n, latent_n = unit_nd.shape[0], z.indices_n
        off_f = -self.min_f / span_f  # the normalised value of a latent where it is inactive (0)
        on_n = (z.values_n.double() - self.min_f[latent_n]) / span_f[latent_n]
        delta_n, delta_squares_n = on_n - off_f[latent_n], on_n.pow(2) - off_f[latent_n].pow(2)
        entries_fn = torch.sparse_coo_tensor(
            torch.stack([latent_n, z.rows_n]), delta_n, (z.n_latents, n), check_invariants=False
        )
        self.weighted_fe.addr_(off_f, unit_nd.sum(0)).add_(torch.sparse.mm(entries_fn, unit_nd))
        self.sum_f += n * off_f + torch.zeros_like(off_f).index_add_(0, latent_n, delta_n)
        squares_f = torch.zeros_like(off_f).index_add_(0, latent_n, delta_squares_n)
        self.sum_squares_f += n * off_f.pow(2) + squares_f

    def score(self) -> torch.Tensor:
        numerator_f = (self.weighted_fe.pow(2).sum(-1) - self.sum_squares_f) / 2
        denominator_f = (self.sum_f.pow(2) - self.sum_squares_f) / 2
        # exact zero pairs (a single nonzero image) are 0/0; tiny negatives are rounding of zero
        valid_f = (self.max_f > self.min_f) & (denominator_f > 1e-12 * self.sum_f.pow(2).clamp_min(1e-300))
        return torch.where(valid_f, numerator_f / denominator_f, torch.nan).float()


def _sparse_min_max(z: SparseLatents) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-latent min and max over the batch's rows, an inactive latent counting as 0."""
    values_n = z.values_n.double()
    always_on_f = torch.bincount(z.indices_n, minlength=z.n_latents) == z.batch_size
    # a latent off on some row has 0 among its values; one on every row has only its entries
    start_min_f = torch.where(always_on_f, torch.inf, 0.0).double()
    start_max_f = torch.where(always_on_f, -torch.inf, 0.0).double()
    min_f = start_min_f.scatter_reduce(0, z.indices_n, values_n, "amin")
    max_f = start_max_f.scatter_reduce(0, z.indices_n, values_n, "amax")
    return min_f, max_f


def monosemanticity_score(
    activations: torch.Tensor, embeddings: torch.Tensor, chunk_size: int = 8192
) -> torch.Tensor:
    """MS of every neuron: activations [N, F] of N images, embeddings [N, D] of the same images -> [F]."""
    if activations.ndim != 2 or embeddings.ndim != 2 or activations.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"expected activations [N, F] and embeddings [N, D] over the same N images, got "
            f"{tuple(activations.shape)} and {tuple(embeddings.shape)}"
        )
    accumulator = MonosemanticityAccumulator(activations.shape[1], embeddings.shape[1])
    for start in range(0, activations.shape[0], chunk_size):
        accumulator.observe(activations[start : start + chunk_size])
    for start in range(0, activations.shape[0], chunk_size):
        accumulator.accumulate(
            activations[start : start + chunk_size], embeddings[start : start + chunk_size]
        )
    return accumulator.score()
