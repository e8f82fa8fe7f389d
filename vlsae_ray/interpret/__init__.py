"""Interpretation: each latent's top-activating examples, its name, and the concept catalog."""

from vlsae_ray.interpret.catalog import read_catalog
from vlsae_ray.interpret.label import run_label
from vlsae_ray.interpret.top_examples import top_examples

__all__ = ["read_catalog", "run_label", "top_examples"]
