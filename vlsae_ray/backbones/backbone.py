"""One interface over every library: load a VLM, name its hook points, read activation rows.

Each library module (`open_clip`, `hf_clip`, `llava`) provides the same functions:
`image_preprocessor`, `meta_model` (the architecture, no weights), `hook_points(model)`
({name: "image" | "text"}), `required_inputs`, `hook_width`, `load_model`, `load_tokenizer` and
`hook_outputs` (one forward of each tower the hooks need). `Backbone` adds what all share: hook
point validation, input checks and the token modes (`rows.select_rows`).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from PIL import Image

from vlsae_ray.backbones import hf_clip, llava
from vlsae_ray.backbones import open_clip as open_clip_backbone
from vlsae_ray.backbones.rows import Activations, select_rows
from vlsae_ray.config import BackboneConfig, TokenConfig

CLS = TokenConfig()
LIBRARIES: dict[str, ModuleType] = {"open_clip": open_clip_backbone, "transformers": hf_clip, "llava": llava}


def resolve_device(device: str) -> torch.device:
    """The device of `backbone.device` for a model this process loads outside Ray's assignment."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("backbone.device is 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    return torch.device(device)


def check_hook_points(valid: dict[str, str], hook_points: list[str]) -> None:
    for name in hook_points:
        if name not in valid:
            raise ValueError(
                f"hook point {name!r} is not in this model; valid hook points: {', '.join(valid)}"
            )


def image_preprocessor(config: BackboneConfig) -> Callable[[Image.Image], torch.Tensor]:
    """The model's eval-time image transform (PIL -> [3, H, W]), with no weights loaded.

    CPU preprocessing tasks use this so only the model actors hold weights.
    """
    return LIBRARIES[config.library].image_preprocessor(config)


def valid_hook_points(config: BackboneConfig) -> dict[str, str]:
    """{hook point: "image" | "text"}: the input modality each one reads, from the architecture alone."""
    library = LIBRARIES[config.library]
    return library.hook_points(library.meta_model(config))


def hook_dims(config: BackboneConfig, hook_points: list[str]) -> dict[str, int]:
    """Validate hook point names and find each one's width, with no weights (a meta-device model).

    Costs a fraction of a second even for large models, so jobs check their config before any work.
    """
    library = LIBRARIES[config.library]
    model = library.meta_model(config)
    check_hook_points(library.hook_points(model), hook_points)
    return {name: library.hook_width(model, name) for name in hook_points}


def required_inputs(config: BackboneConfig, hook_points: list[str]) -> set[str]:
    """The inputs ("pixels", "texts") that `activations` needs for these hook points (LLaVA's
    language-model hooks need both), from the architecture alone."""
    library, modality = LIBRARIES[config.library], valid_hook_points(config)
    check_hook_points(modality, hook_points)
    return set().union(*(library.required_inputs(name, modality[name]) for name in hook_points))


class Backbone:
    """A VLM with its weights loaded on `device` (default: `config.device`), read at named hook points.

    Ray actors and replicas pass the device Ray assigned them (`vlsae_ray.devices.assigned_device`).
    """

    def __init__(self, config: BackboneConfig, device: torch.device | None = None):
        self.config = config
        self.library = LIBRARIES[config.library]
        self.device = resolve_device(config.device) if device is None else device
        self.model = self.library.load_model(config, self.device).eval()
        self.tokenizer = self.library.load_tokenizer(config)
        self.preprocess = self.library.image_preprocessor(config)
        self.hook_points = self.library.hook_points(self.model)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images])

    @torch.no_grad()
    def activations(
        self,
        hook_points: list[str],
        *,
        pixels: torch.Tensor | None = None,
        texts: list[str] | None = None,
        item_ids: list[str] | None = None,
        token: TokenConfig = CLS,
    ) -> dict[str, Activations]:
        """{hook point: its rows} for a batch of items, running each tower the hooks need once.

        `pixels` ([B, 3, H, W], from `image_preprocessor`) feed image hooks, `texts` (B captions)
        text hooks; `item_ids` name the B items (random token draws are seeded by them).
        """
        check_hook_points(self.hook_points, hook_points)
        given = {"pixels": pixels is not None, "texts": texts is not None}
        for name in hook_points:
            for needed in self.library.required_inputs(name, self.hook_points[name]):
                if not given[needed]:
                    raise ValueError(f"hook point {name!r} reads {needed}, but {needed}=None was passed")
        n_items = len(pixels) if pixels is not None else len(texts or [])
        if item_ids is None or len(item_ids) != n_items or (texts is not None and len(texts) != n_items):
            raise ValueError(
                f"a batch needs one item id (and one caption, with texts) per item: got {n_items} items, "
                f"{None if item_ids is None else len(item_ids)} item_ids, "
                f"{None if texts is None else len(texts)} texts"
            )
        outputs = self.library.hook_outputs(self, hook_points, pixels, texts)
        return {name: select_rows(outputs[name], item_ids, token) for name in hook_points}


def load_backbone(config: BackboneConfig, device: torch.device | None = None) -> Backbone:
    """The model of `config`, weights loaded, on `device` (default: `config.device`)."""
    return Backbone(config, device)
