"""Each latent's exact top-k rows over a dataset, mergeable across Ray tasks.

Order: larger activation first, ties towards the earlier row (global row index), so the result is
the same whatever the split into shards and tasks and whatever the merge order. Only rows where
the latent fires (activation > 0) belong to its top set.
"""

from __future__ import annotations

import torch


class TopRows:
    """Running top-k per column of [n, F] matrices, with the rows' source ids (and vectors if asked)."""

    def __init__(self, k: int, n_columns: int, keep_vectors: bool = False):
        self.k = k
        self.values_kf = torch.full((0, n_columns), float("-inf"))
        self.rows_kf = torch.zeros((0, n_columns), dtype=torch.long)
        self.source_ids: dict[int, str] = {}
        self.keep_vectors = keep_vectors
        self.vectors: dict[int, torch.Tensor] = {}

    def update(
        self, values_nf: torch.Tensor, first_row: int, source_ids: list[str], x_nd: torch.Tensor | None = None
    ) -> None:
        """Add rows first_row, first_row + 1, ... with their latent values [n, F]."""
        rows_nf = torch.arange(first_row, first_row + values_nf.shape[0]).unsqueeze(1).expand_as(values_nf)
        self._keep(torch.cat([self.values_kf, values_nf.float()]), torch.cat([self.rows_kf, rows_nf]))
        for row in self.rows_kf.unique().tolist():
            if first_row <= row < first_row + values_nf.shape[0]:
                self.source_ids[row] = source_ids[row - first_row]
                if self.keep_vectors:
                    self.vectors[row] = x_nd[row - first_row].float().clone()
        self._prune()

    def merge(self, other: TopRows) -> None:
        self._keep(torch.cat([self.values_kf, other.values_kf]), torch.cat([self.rows_kf, other.rows_kf]))
        self.source_ids.update(other.source_ids)
        self.vectors.update(other.vectors)
        self._prune()

    def _keep(self, values: torch.Tensor, rows: torch.Tensor) -> None:
        by_row = torch.sort(rows, dim=0, stable=True).indices  # ties: the earlier row first
        values, rows = values.gather(0, by_row), rows.gather(0, by_row)
        order = torch.sort(values, dim=0, descending=True, stable=True).indices[: self.k]
        self.values_kf, self.rows_kf = values.gather(0, order), rows.gather(0, order)

    def _prune(self) -> None:
        kept = set(self.rows_kf[self.values_kf > 0].tolist())
        self.source_ids = {row: sid for row, sid in self.source_ids.items() if row in kept}
        self.vectors = {row: v for row, v in self.vectors.items() if row in kept}

    def sets(self) -> list[list[int]]:
        """Per latent, its top rows (activation > 0), largest first."""
        fired_kf = self.values_kf > 0
        return [self.rows_kf[fired_kf[:, j], j].tolist() for j in range(self.values_kf.shape[1])]
