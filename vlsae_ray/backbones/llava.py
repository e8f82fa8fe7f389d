"""LLaVA backbones: a `LlavaForConditionalGeneration` folder made by `save_pretrained`.

The folder is a local path, file:// or s3:// URI, read as for transformers CLIP (`hf_clip`): an
s3:// folder is copied into this machine's cache, its weights only where the model is loaded.

Hook points are module names in its `LlavaModel` (`model.model`):
- `vision_tower.encoder.layers.{i}`: the residual stream after vision layer i ([B, tokens, d],
  token 0 the class token). LLaVA-1.5 feeds the projector layer -2 (`vision_feature_layer=-2`),
  i.e. `vision_tower.encoder.layers.{n_layers - 2}` without its class token.
- `language_model.layers.{i}:image_mean` and `language_model.layers.{i}:text_mean`: the language
  model's hidden state after layer i, averaged over the image tokens and over the caption's text
  tokens, from one forward of the whole model on an image + caption prompt (VL-SAE, arXiv
  2510.21323, Sec. 3.1). Both need pixels and texts, and give one row per item.

The prompt is the image placeholder once per image token, a newline and the caption
(`PROMPT`), tokenized by the tokenizer saved with the model, padded on the right so a caption's
hidden states do not depend on the rest of its batch. Text tokens are the prompt's tokens that
are neither image placeholders, special tokens nor padding.

- `language_model.layers.{i}:chat_image_mean` and `:chat_text_mean`: the VL-SAE authors' reduction
  (their `activation_collector.py`): the caption as a user turn after the image in the model's chat
  template, with the generation prompt ("USER: <image>\n{caption} ASSISTANT:"), the hidden state
  *entering* layer i (their hook reads layer 30's input), and the text mean over every position
  after the image, the template's tokens included. This is what hallucination mitigation edits at
  generation time (the question and the answer so far follow the image), so an aligner meant for it
  trains on these (`vlsae_ray.steer.hallucination`). The input of layer i is the output of layer
  i - 1, the image features merged in for i = 0.
"""

from __future__ import annotations

import torch

from vlsae_ray.backbones.hf_clip import image_preprocessor, model_folder, pretrained_config
from vlsae_ray.backbones.hooks import run_with_hooks
from vlsae_ray.backbones.rows import HookOutput
from vlsae_ray.config import BackboneConfig

__all__ = ["image_preprocessor"]  # the image processor saved with the model, as for transformers CLIP

PROMPT = "{image}\n{caption}"
IMAGE_MEAN, TEXT_MEAN = ":image_mean", ":text_mean"
CHAT_IMAGE_MEAN, CHAT_TEXT_MEAN = ":chat_image_mean", ":chat_text_mean"


def _llava_config(config: BackboneConfig):
    return pretrained_config(
        config,
        "llava",
        "use library: transformers for a CLIPModel, or a folder saved from LlavaForConditionalGeneration",
    )


def meta_model(config: BackboneConfig) -> torch.nn.Module:
    from transformers import LlavaForConditionalGeneration

    model_config = _llava_config(config)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(model_config)


def load_model(config: BackboneConfig, device: torch.device) -> torch.nn.Module:
    from transformers import LlavaForConditionalGeneration

    model_config = _llava_config(config)  # checked once, and handed on instead of parsed again
    model = LlavaForConditionalGeneration.from_pretrained(
        model_folder(config, weights=True), config=model_config, local_files_only=True
    )
    return model.to(device)


def load_tokenizer(config: BackboneConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder(config), padding_side="right")


def load_processor(config: BackboneConfig):
    """The processor saved with the model (tokenizer, chat template, image processor), for `generate`."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_folder(config))


def hook_points(model: torch.nn.Module) -> dict[str, str]:
    base = model.model
    n_vision_layers = len(base.vision_tower.encoder.layers)
    points = {f"vision_tower.encoder.layers.{i}": "image" for i in range(n_vision_layers)}
    for i in range(len(base.language_model.layers)):
        layer = f"language_model.layers.{i}"
        points |= {f"{layer}{IMAGE_MEAN}": "image", f"{layer}{TEXT_MEAN}": "text"}
        points |= {f"{layer}{CHAT_IMAGE_MEAN}": "image", f"{layer}{CHAT_TEXT_MEAN}": "text"}
    return points


def required_inputs(hook_point: str, modality: str) -> set[str]:
    return {"pixels", "texts"} if hook_point.startswith("language_model.") else {"pixels"}


def hook_width(model: torch.nn.Module, hook_point: str) -> int:
    tower = model.config.vision_config if hook_point.startswith("vision_tower.") else model.config.text_config
    return tower.hidden_size


def image_token_count(model_config) -> int:
    """Placeholders per image: one per patch, plus the class token under the 'full' strategy."""
    vision = model_config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (model_config.vision_feature_select_strategy == "full")


def hook_outputs(backbone, hook_points: list[str], pixels, texts) -> dict[str, HookOutput]:
    """Each requested hook's output: the vision tower alone when only its hooks are asked for, else
    one forward of the whole model per prompt form asked for (plain, chat)."""
    base = backbone.model.model
    pixels = pixels.to(backbone.device, base.vision_tower.dtype)
    chat = [name for name in hook_points if name.endswith((CHAT_IMAGE_MEAN, CHAT_TEXT_MEAN))]
    plain = [name for name in hook_points if name not in chat]
    outputs = _plain_outputs(backbone, plain, pixels, texts) if plain else {}
    return outputs | (_chat_outputs(backbone, chat, pixels, texts) if chat else {})


def _masked_means(names, hidden: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], texts):
    """{name: mean over the positions of its reduction's mask} of hidden states [B, T, d] by name."""
    outputs = {}
    for name in names:
        reduction = name.partition(":")[2]
        mask_bt = masks[reduction]
        empty = [texts[b] for b in (~mask_bt.any(dim=1)).nonzero().flatten().tolist()]
        if empty:
            raise ValueError(f"hook point {name!r}: no {reduction[:-5]} tokens in the prompts of {empty}")
        x_btd = hidden[name]
        outputs[name] = HookOutput((x_btd * mask_bt[..., None]).sum(1) / mask_bt.sum(1, keepdim=True))
    return outputs


def _plain_outputs(backbone, hook_points: list[str], pixels, texts) -> dict[str, HookOutput]:
    base, model_config = backbone.model.model, backbone.model.config
    modules = {name.split(":")[0] for name in hook_points}
    module_names = sorted(f"model.{name}" for name in modules)
    if not any(name.startswith("language_model.") for name in hook_points):
        captured, _ = run_with_hooks(backbone.model, module_names, lambda: base.vision_tower(pixels))
        return {name: HookOutput(captured[f"model.{name}"]) for name in hook_points}
    image = backbone.tokenizer.convert_ids_to_tokens(model_config.image_token_id)
    prompts = [PROMPT.format(image=image * image_token_count(model_config), caption=text) for text in texts]
    tokens = backbone.tokenizer(prompts, padding=True, return_tensors="pt").to(backbone.device)
    captured, _ = run_with_hooks(
        backbone.model,
        module_names,
        lambda: base(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels),
    )
    real_bt = tokens.attention_mask.bool()
    image_bt = tokens.input_ids == model_config.image_token_id
    special_ids = torch.tensor(backbone.tokenizer.all_special_ids, device=backbone.device)
    special_bt = torch.isin(tokens.input_ids, special_ids)
    masks = {IMAGE_MEAN[1:]: image_bt, TEXT_MEAN[1:]: real_bt & ~image_bt & ~special_bt}
    means = [name for name in hook_points if ":" in name]
    outputs = {name: HookOutput(captured[f"model.{name}"]) for name in hook_points if ":" not in name}
    hidden = {name: captured[f"model.{name.split(':')[0]}"] for name in means}
    return outputs | _masked_means(means, hidden, masks, texts)


def _chat_outputs(backbone, hook_points: list[str], pixels, texts) -> dict[str, HookOutput]:
    """The authors' reduction: inputs of the layers, on the chat prompt, template tokens included."""
    base, model_config = backbone.model.model, backbone.model.config
    image = backbone.tokenizer.convert_ids_to_tokens(model_config.image_token_id)
    turns = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}] for t in texts]
    prompts = backbone.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    prompts = [p.replace(image, image * image_token_count(model_config)) for p in prompts]
    tokens = backbone.tokenizer(prompts, padding=True, return_tensors="pt").to(backbone.device)
    out = base(
        input_ids=tokens.input_ids,
        attention_mask=tokens.attention_mask,
        pixel_values=pixels,
        output_hidden_states=True,
    )
    image_bt = tokens.input_ids == model_config.image_token_id
    after_image_bt = image_bt.long().cumsum(1) == image_bt.sum(1, keepdim=True)  # past the last one
    masks = {
        CHAT_IMAGE_MEAN[1:]: image_bt,
        CHAT_TEXT_MEAN[1:]: after_image_bt & ~image_bt & tokens.attention_mask.bool(),
    }
    # hidden_states[i] enters layer i (hidden_states[0]: the embeddings with the image features)
    layer = {name: int(name.split(":")[0].rsplit(".", 1)[1]) for name in hook_points}
    hidden = {name: out.hidden_states[i] for name, i in layer.items()}
    return _masked_means(hook_points, hidden, masks, texts)
