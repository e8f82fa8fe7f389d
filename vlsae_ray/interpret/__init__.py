"""Interpretation: top-activating examples of each latent."""

from vlsae_ray.interpret.top_examples import TopK, run_label

__all__ = ["TopK", "run_label"]
