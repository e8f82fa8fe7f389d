"""VLM wrappers: load a model the way its library does and read activation rows at named hook points.

`load_backbone(config).activations(hook_points, pixels=..., texts=..., item_ids=..., token=...)`
gives, per hook point, `Activations(values [R, d], item [R], token [R])`. Libraries: open_clip
(`open_clip.py`), transformers CLIP (`hf_clip.py`), LLaVA (`llava.py`); the token modes are in
`rows.py`.
"""

from vlsae_ray.backbones.backbone import (
    Backbone,
    hook_dims,
    image_preprocessor,
    load_backbone,
    required_inputs,
    valid_hook_points,
)
from vlsae_ray.backbones.open_clip import builtin_backbone
from vlsae_ray.backbones.rows import Activations

__all__ = [
    "Activations",
    "Backbone",
    "builtin_backbone",
    "hook_dims",
    "image_preprocessor",
    "load_backbone",
    "required_inputs",
    "valid_hook_points",
]
