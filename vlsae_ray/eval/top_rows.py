"""Each latent's exact top-k rows over a dataset, mergeable across Ray tasks (`TopK`), for the
evaluate job's reports and the label job's top examples alike.

Order: larger activation first, ties towards the earlier row (global row index), so the result is
the same whatever the split into shards and tasks and whatever the merge order. Only rows where
the latent fires (activation > 0) belong to its top set.
"""

from __future__ import annotations

import torch

from vlsae_ray.sae.kernels import SparseLatents

# the row id of padding in a shard with fewer than k rows: its -inf value never wins
NO_ROW = torch.iinfo(torch.long).max


def merge_top_k(values_mf: torch.Tensor, rows_mf: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values per column of candidates [m, F] and their rows; ties to the smaller row."""
    by_row = rows_mf.argsort(dim=0, stable=True)
    values_mf, rows_mf = values_mf.gather(0, by_row), rows_mf.gather(0, by_row)
    order = torch.sort(values_mf, dim=0, descending=True, stable=True).indices[:k]
    return values_mf.gather(0, order), rows_mf.gather(0, order)


class TopK:
    """Running exact top-k per latent of a stream of SAE latents, with global row indices.

    `update` takes the next rows of the stream, or any rows with `first_row` saying where they start.
    The result equals the top-k of each column of the dense [rows, F] latents (inactive = 0).
    """

    def __init__(self, k: int, n_columns: int):
        self.k = k
        self.values_kf = torch.full((0, n_columns), float("-inf"))
        self.rows_kf = torch.zeros((0, n_columns), dtype=torch.long)
        self.seen = 0

    def update(self, z: SparseLatents, first_row: int | None = None) -> None:
        """Add a batch's latents: O(entries + k·F), never the dense [B, F].

        Candidates are the batch's first k rows (dense) and the active entries of later rows. That
        is exact because latents are never negative: a later row where a latent is inactive (0) is
        beaten by each of the first k rows (each >= 0 and earlier), so it cannot be in the top k.
        """
        first_row = self.seen if first_row is None else first_row
        self.seen = max(self.seen, first_row + z.batch_size)
        head = min(self.k, z.batch_size)
        in_head_n = z.rows_n < head
        head_hf = z.values_n.new_zeros(head, z.n_latents)
        head_hf[z.rows_n[in_head_n], z.indices_n[in_head_n]] = z.values_n[in_head_n]
        head_rows_hf = torch.arange(first_row, first_row + head).unsqueeze(1).expand(head, z.n_latents)
        # rank each latent's later entries: larger first, ties to the earlier row (entries are row-ordered)
        rest_n = ~in_head_n
        latent_n, value_n, row_n = z.indices_n[rest_n], z.values_n[rest_n], z.rows_n[rest_n]
        order_n = value_n.argsort(descending=True, stable=True)
        order_n = order_n[latent_n[order_n].argsort(stable=True)]
        latent_n, value_n, row_n = latent_n[order_n], value_n[order_n], row_n[order_n]
        counts_f = torch.bincount(latent_n, minlength=z.n_latents)
        rank_n = torch.arange(latent_n.numel()) - (counts_f.cumsum(0) - counts_f)[latent_n]
        keep_n = rank_n < self.k
        depth = int(counts_f.max().clamp(max=self.k)) if latent_n.numel() else 0
        rest_kf = torch.full((depth, z.n_latents), float("-inf"))
        rest_rows_kf = torch.full((depth, z.n_latents), NO_ROW)
        rest_kf[rank_n[keep_n], latent_n[keep_n]] = value_n[keep_n].float()
        rest_rows_kf[rank_n[keep_n], latent_n[keep_n]] = row_n[keep_n] + first_row
        self.merge(torch.cat([head_hf.float(), rest_kf]), torch.cat([head_rows_hf, rest_rows_kf]))

    def merge(self, values_mf: torch.Tensor, rows_mf: torch.Tensor) -> None:
        """Fold in candidates [m, F] with their global rows (another TopK's result, say)."""
        self.values_kf, self.rows_kf = merge_top_k(
            torch.cat([self.values_kf, values_mf]), torch.cat([self.rows_kf, rows_mf]), self.k
        )


class TopRows(TopK):
    """`TopK` that also keeps its rows' source ids (and vectors if asked), for reports and uniqueness."""

    def __init__(self, k: int, n_columns: int, keep_vectors: bool = False):
        super().__init__(k, n_columns)
        self.source_ids: dict[int, str] = {}
        self.keep_vectors = keep_vectors
        self.vectors: dict[int, torch.Tensor] = {}

    def update(
        self, z: SparseLatents, first_row: int, source_ids: list[str], x_nd: torch.Tensor | None = None
    ) -> None:
        """Add rows first_row, first_row + 1, ... with their latents."""
        super().update(z, first_row)
        for row in self.rows_kf.unique().tolist():
            if first_row <= row < first_row + z.batch_size:
                self.source_ids[row] = source_ids[row - first_row]
                if self.keep_vectors:
                    self.vectors[row] = x_nd[row - first_row].float().clone()
        self._prune()

    def merge_rows(self, other: TopRows) -> None:
        """Fold in another part's TopRows (a Ray task's result)."""
        self.merge(other.values_kf, other.rows_kf)
        self.source_ids.update(other.source_ids)
        self.vectors.update(other.vectors)
        self._prune()

    def _prune(self) -> None:
        kept = set(self.rows_kf[self.values_kf > 0].tolist())
        self.source_ids = {row: sid for row, sid in self.source_ids.items() if row in kept}
        self.vectors = {row: v for row, v in self.vectors.items() if row in kept}

    def sets(self) -> list[list[int]]:
        """Per latent, its top rows (activation > 0), largest first."""
        fired_kf = self.values_kf > 0
        return [self.rows_kf[fired_kf[:, j], j].tolist() for j in range(self.values_kf.shape[1])]
