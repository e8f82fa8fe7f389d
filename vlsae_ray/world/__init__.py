"""The built-in ground-truth concept world: generated image-caption pairs with known concepts,
a tiny CLIP trained on them (committed checkpoint, loaded like a user's), and a tiny LLaVA whose
vision tower is that CLIP.

    items = generate_items(100, split="test")             # held-out (shape, colour) pairs
    model, preprocess, tokenizer = load_world_clip()      # open_clip's pretrained=FILE path
    evaluate_world_clip()["accuracy"]                     # zero-shot accuracy per attribute
    llava, image_processor = build_world_llava()          # vision tower = world CLIP

Submodules import open_clip and transformers lazily, so `import vlsae_ray.world` stays cheap.
"""

from vlsae_ray.world.clip import CHECKPOINT_PATH, MODEL_NAME, load_world_clip, register_world_clip
from vlsae_ray.world.concepts import ATTRIBUTES, HELDOUT_COMBOS, SPLITS
from vlsae_ray.world.generator import WorldItem, generate_item, generate_items
from vlsae_ray.world.llava import build_world_llava
from vlsae_ray.world.train import TrainResult, train_world_clip
from vlsae_ray.world.zeroshot import evaluate_world_clip, zero_shot_accuracy

__all__ = [
    "ATTRIBUTES",
    "CHECKPOINT_PATH",
    "HELDOUT_COMBOS",
    "MODEL_NAME",
    "SPLITS",
    "TrainResult",
    "WorldItem",
    "build_world_llava",
    "evaluate_world_clip",
    "generate_item",
    "generate_items",
    "load_world_clip",
    "register_world_clip",
    "train_world_clip",
    "zero_shot_accuracy",
]
