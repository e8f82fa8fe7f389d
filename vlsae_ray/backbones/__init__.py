"""VLM wrappers: load a model the way its library does and read activations at named hook points."""

from vlsae_ray.backbones.open_clip import Backbone, hook_dims, image_preprocessor, save_builtin_checkpoint

__all__ = ["Backbone", "hook_dims", "image_preprocessor", "save_builtin_checkpoint"]
