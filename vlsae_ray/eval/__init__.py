"""Evaluation: reconstruction, sparsity, dead latents and the Monosemanticity Score."""

from vlsae_ray.eval.metrics import ReconstructionStats, fvu, l0
from vlsae_ray.eval.monosemanticity import MonosemanticityAccumulator, monosemanticity_score

__all__ = ["MonosemanticityAccumulator", "ReconstructionStats", "fvu", "l0", "monosemanticity_score"]
