"""Evaluation: reconstruction, sparsity, dead latents, the Monosemanticity Score (in memory and as a
Ray Data map-reduce over a stored dataset), uniqueness, downstream checks and the report."""

from vlsae_ray.eval.dataset_pass import monosemanticity_map_reduce
from vlsae_ray.eval.metrics import ReconstructionStats, fvu, l0
from vlsae_ray.eval.monosemanticity import MonosemanticityAccumulator, monosemanticity_score

__all__ = [
    "MonosemanticityAccumulator",
    "ReconstructionStats",
    "fvu",
    "l0",
    "monosemanticity_map_reduce",
    "monosemanticity_score",
]
