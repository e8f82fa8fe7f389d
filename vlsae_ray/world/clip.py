"""The world's tiny CLIP: an open_clip model config, and loading its committed checkpoint.

`load_world_clip` goes through open_clip's own local-checkpoint path
(`create_model_and_transforms(name, pretrained=FILE)`), exactly as a user's real CLIP would, so
everything downstream is exercised on the code path real models take.
"""

from pathlib import Path

import vlsae_ray  # noqa: F401  (installs the torchvision import guard before open_clip loads)

MODEL_NAME = "world-clip"
CONFIG_PATH = Path(__file__).parent / "model_configs" / f"{MODEL_NAME}.json"
CHECKPOINT_PATH = Path(__file__).parent / "checkpoints" / f"{MODEL_NAME}.pt"


def register_world_clip() -> str:
    """Make "world-clip" a model name open_clip knows; safe to call any number of times."""
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)
    return MODEL_NAME


def load_world_clip(device: str = "cpu", checkpoint: str | Path = CHECKPOINT_PATH):
    """(model, preprocess, tokenizer) for the world CLIP, in eval mode, from `checkpoint`."""
    import open_clip

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"world CLIP checkpoint {checkpoint} not found; make it with "
            "vlsae_ray.world.train.train_world_clip(out_path=...)"
        )
    register_world_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL_NAME, pretrained=str(checkpoint), device=device
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(MODEL_NAME)
