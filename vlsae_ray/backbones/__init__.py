"""VLM wrappers: load a model the way its library does and read activations at named hook points."""

from vlsae_ray.backbones.open_clip import Backbone, builtin_backbone, hook_dims, image_preprocessor

__all__ = ["Backbone", "builtin_backbone", "hook_dims", "image_preprocessor"]
