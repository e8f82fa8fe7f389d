"""The built-in ground-truth concept world: generated image-caption pairs with known concepts,
a tiny CLIP trained on them (committed checkpoint, loaded like a user's), and a tiny LLaVA whose
vision tower is that CLIP and whose projector and language model are trained on visual question
answering about the world (committed `save_pretrained` folder, loaded like a user's).

    items = generate_items(100, split="test")             # held-out (shape, colour) pairs
    model, preprocess, tokenizer = load_world_clip()      # open_clip's pretrained=FILE path
    evaluate_world_clip()["accuracy"]                     # zero-shot accuracy per attribute
    llava, processor = load_world_llava()                 # from_pretrained + AutoProcessor
    answer(llava, processor, images, ONE_WORD_PROMPT)     # greedy answers, one per image
    evaluate_world_llava(500, seed=0)                     # held-out accuracy per question type

Submodules import open_clip and transformers lazily, so `import vlsae_ray.world` stays cheap.
"""

from vlsae_ray.world.clip import CHECKPOINT_PATH, MODEL_NAME, load_world_clip, register_world_clip
from vlsae_ray.world.concepts import ATTRIBUTES, HELDOUT_COMBOS, SPLITS
from vlsae_ray.world.generator import WorldItem, generate_item, generate_items
from vlsae_ray.world.llava import (
    ATTRIBUTE_QUESTIONS,
    ONE_WORD_PROMPT,
    VISION_FEATURE_HOOK,
    WORLD_LLAVA_PATH,
    answer,
    build_world_llava,
    evaluate_world_llava,
    load_world_llava,
    parse_answer,
)
from vlsae_ray.world.train import TrainResult, train_world_clip
from vlsae_ray.world.zeroshot import evaluate_world_clip, zero_shot_accuracy

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_QUESTIONS",
    "CHECKPOINT_PATH",
    "HELDOUT_COMBOS",
    "MODEL_NAME",
    "ONE_WORD_PROMPT",
    "SPLITS",
    "TrainResult",
    "VISION_FEATURE_HOOK",
    "WORLD_LLAVA_PATH",
    "WorldItem",
    "answer",
    "build_world_llava",
    "evaluate_world_clip",
    "evaluate_world_llava",
    "generate_item",
    "generate_items",
    "load_world_clip",
    "load_world_llava",
    "parse_answer",
    "register_world_clip",
    "train_world_clip",
    "zero_shot_accuracy",
]
