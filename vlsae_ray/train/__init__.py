"""SAE training: the shared optimisation step and single-process training."""

from vlsae_ray.train.local import fit_local
from vlsae_ray.train.step import SAETrainer

__all__ = ["SAETrainer", "fit_local"]
