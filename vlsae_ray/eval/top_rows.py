"""Each latent's exact top-k rows over a dataset, mergeable across Ray tasks.

Order: larger activation first, ties towards the earlier row (global row index), so the result is
the same whatever the split into shards and tasks and whatever the merge order. Only rows where
the latent fires (activation > 0) belong to its top set.
"""

from __future__ import annotations

import torch

from vlsae_ray.interpret.top_examples import TopK
from vlsae_ray.sae.kernels import SparseLatents


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
