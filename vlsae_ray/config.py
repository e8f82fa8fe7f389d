"""Every job's YAML config as a pydantic model, and the one loader that reads them.

An unknown key or a bad value fails in `load_config`, before any work starts, with a message
naming the key, what was given and the expected form.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlsae_ray import storage
from vlsae_ray.sae import SAEConfig


class ConfigError(ValueError):
    """A config file that cannot be used as written."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(Strict):
    """Where the images and captions come from."""

    kind: Literal["world", "package_photos"] = Field(
        "world",
        description="world: the built-in concept world (images with known shapes, colours, ...); "
        "package_photos: real photos shipped inside scikit-image, scikit-learn and matplotlib, with "
        "seeded random crops and flips",
    )
    n_items: int = Field(2048, gt=0, description="how many image-caption items to make")
    seed: int = Field(0, description="seed of the items")
    split: Literal["train", "test"] = Field(
        "train", description="world only: train, or test (the held-out shape-colour pairs)"
    )


class BackboneConfig(Strict):
    """The vision-language model whose activations we read."""

    library: Literal["open_clip", "transformers", "llava"] = Field(
        "open_clip",
        description="open_clip: an open_clip model; transformers: a transformers CLIPModel; "
        "llava: a transformers LlavaForConditionalGeneration",
    )
    model: str = Field(
        description="open_clip: model name (e.g. ViT-B-32 or the built-in world-clip); transformers and "
        "llava: a local folder or URI holding the model's save_pretrained files"
    )
    pretrained: str | None = Field(
        None,
        description="open_clip only: pretrained tag, or a checkpoint file as a path, file:// or s3:// URI",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is visible")


class TokenConfig(Strict):
    """Which rows a sequence output (a [tokens, d] block output) contributes per item."""

    mode: Literal["cls", "random", "mean", "all"] = Field(
        "cls",
        description="cls: the class token (the EOT token for text); random: `k` tokens drawn per item, "
        "seeded by `seed` and the item id; mean: the mean over tokens; all: every token",
    )
    k: int = Field(1, gt=0, description="random mode: tokens drawn per item")
    seed: int = Field(0, description="random mode: seed of the draw")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: object) -> object:
        return {"mode": value} if isinstance(value, str) else value

    def __str__(self) -> str:
        return f"random:{self.k}:{self.seed}" if self.mode == "random" else self.mode


class ExtractConfig(Strict):
    source: SourceConfig = SourceConfig()
    backbone: BackboneConfig
    hook_points: list[str] = Field(
        min_length=1,
        description="module names in the model, e.g. visual.transformer.resblocks.3 (that block's output "
        "residual stream) or visual (the image embedding); one activation dataset each",
    )
    token: TokenConfig = Field(TokenConfig(), description="which tokens of a sequence output become rows")
    output: str = Field(description="URI under which each hook point's dataset is written")
    shard_rows: int = Field(1024, gt=0, description="rows per shard")
    batch_size: int = Field(64, gt=0, description="images per model forward")
    concurrency: int = Field(1, gt=0, description="model actors")
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class TrainingConfig(Strict):
    batch_size: int = Field(1024, gt=0, description="global batch size (split across workers)")
    epochs: int = Field(1, gt=0)
    seed: int = 0
    lr: float | None = Field(None, gt=0, description="None: 2e-4 / sqrt(n_latents / 2**14)")
    num_workers: int = Field(2, gt=0, description="Ray Train workers (data parallel)")
    cpus_per_worker: float = Field(
        0.5, gt=0, description="below 1 on small machines, so Ray Data's read tasks can run beside them"
    )
    use_gpu: bool = False


class TrainConfig(Strict):
    activations: str = Field(description="URI of an activation dataset (a folder with manifest.json)")
    sae: SAEConfig
    training: TrainingConfig = TrainingConfig()
    output: str = Field(description="URI of the folder the trained SAE is saved to")


class EvaluateConfig(Strict):
    sae: str = Field(description="URI of a saved SAE")
    activations: str = Field(description="URI of the activation dataset to evaluate on")
    embeddings: str | None = Field(
        None,
        description="URI of an image-embedding dataset over the same items (for the Monosemanticity Score)",
    )
    batch_size: int = Field(1024, gt=0)
    output: str = Field(description="URI of the folder the report is written to")


class LabelConfig(Strict):
    sae: str = Field(description="URI of a saved SAE")
    activations: str = Field(description="URI of the activation dataset to search")
    top_k: int = Field(9, gt=0, description="top-activating examples kept per latent")
    batch_size: int = Field(1024, gt=0)
    output: str = Field(description="URI of the folder the labels are written to")


class ServeConfig(Strict):
    sae: str = Field(description="URI of a saved SAE")
    backbone: BackboneConfig
    hook_point: str
    token: TokenConfig = TokenConfig()
    top_k: int = Field(10, gt=0, description="latents returned per image")
    host: str = Field(
        "127.0.0.1", description="address the HTTP proxy binds; 0.0.0.0 only behind a trusted network"
    )
    port: int = Field(8000, gt=0, lt=65536)
    num_replicas: int = Field(1, gt=0)


JobConfig = TypeVar("JobConfig", bound=BaseModel)


def load_config(uri: str, model: type[JobConfig]) -> JobConfig:
    """Read the YAML file at `uri` (path, file:// or s3://) and validate it as `model`."""
    try:
        raw = yaml.safe_load(storage.read_text(uri))
    except FileNotFoundError as error:
        raise ConfigError(f"config file {uri!r} does not exist") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {uri!r} is not valid YAML: {error}") from error
    return parse_config(raw, model, source=uri)


def parse_config(raw: object, model: type[JobConfig], source: str = "config") -> JobConfig:
    """Validate a plain mapping as `model`, with errors that name each bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: invalid {model.__name__}:\n{_explain(error)}") from None


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check its spelling against the config reference)")
        elif item["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)
