"""A tiny LLaVA whose vision tower is the world CLIP's vision transformer, weights included.

The language model is a small Llama with RANDOM, UNTRAINED weights (seeded): its outputs carry no
meaning. What the model is for is exercising LLaVA's real code path end to end (vision tower
hooks at `vision_feature_layer=-2`, the projector, image tokens merged into the text, and SAE
steering inside the vision tower) on a vision tower that does see the world's concepts.
The language model shares the world CLIP's BPE ids (`SimpleTokenizer`); the image placeholder is
one extra id past the end of that vocabulary.
"""

import vlsae_ray  # noqa: F401  (installs the torchvision import guard before open_clip/transformers load)
from vlsae_ray.world.clip import CHECKPOINT_PATH, load_world_clip

CLIP_VOCAB_SIZE = 49408
IMAGE_TOKEN_ID = CLIP_VOCAB_SIZE


def vision_config_from_open_clip(visual):
    """A transformers `CLIPVisionConfig` with the architecture of an open_clip `VisionTransformer`."""
    import torch
    from transformers import CLIPVisionConfig

    block = visual.transformer.resblocks[0]
    width = visual.conv1.out_channels
    act = block.mlp.gelu
    # open_clip's QuickGELU is x * sigmoid(1.702 x), transformers calls it "quick_gelu".
    hidden_act = "gelu" if isinstance(act, torch.nn.GELU) else "quick_gelu"
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act=hidden_act,
        layer_norm_eps=block.ln_1.eps,
        projection_dim=visual.output_dim,
    )


def vision_state_dict_from_open_clip(visual) -> dict:
    """open_clip ViT weights renamed for a transformers `CLIPVisionModel` (fused qkv split in three)."""
    sd = visual.state_dict()
    out = {
        "embeddings.patch_embedding.weight": sd["conv1.weight"],
        "embeddings.class_embedding": sd["class_embedding"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "pre_layrnorm.weight": sd["ln_pre.weight"],
        "pre_layrnorm.bias": sd["ln_pre.bias"],
        "post_layernorm.weight": sd["ln_post.weight"],
        "post_layernorm.bias": sd["ln_post.bias"],
    }
    for i in range(len(visual.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for part, w, b in zip(
            ("q_proj", "k_proj", "v_proj"),
            sd[src + "attn.in_proj_weight"].chunk(3),
            sd[src + "attn.in_proj_bias"].chunk(3),
            strict=True,
        ):
            out[f"{dst}self_attn.{part}.weight"] = w
            out[f"{dst}self_attn.{part}.bias"] = b
        renames = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for a, b in renames.items():
            out[f"{dst}{b}.weight"] = sd[f"{src}{a}.weight"]
            out[f"{dst}{b}.bias"] = sd[f"{src}{a}.bias"]
    return out


def image_processor_from_open_clip(preprocess_cfg: dict):
    """A `CLIPImageProcessor` that prepares pixels as the open_clip model's own preprocess does."""
    from transformers import CLIPImageProcessor

    size = preprocess_cfg["size"]
    side = size[0] if isinstance(size, (tuple, list)) else size
    return CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(preprocess_cfg["mean"]),
        image_std=list(preprocess_cfg["std"]),
        resample=3,  # PIL bicubic, as open_clip's default interpolation
    )


def build_world_llava(
    checkpoint=CHECKPOINT_PATH, *, seed: int = 0, text_hidden: int = 64, text_layers: int = 2
):
    """(LlavaForConditionalGeneration, CLIPImageProcessor): world CLIP vision tower + untrained Llama.

    Vision features come from the second-to-last block, as in LLaVA-1.5 (`vision_feature_layer=-2`,
    CLS dropped), so there are (image_size / patch_size)^2 image tokens per image.
    """
    import open_clip
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    clip, _, _ = load_world_clip(checkpoint=checkpoint)
    visual = clip.visual
    vision_config = vision_config_from_open_clip(visual)
    text_config = LlamaConfig(
        vocab_size=CLIP_VOCAB_SIZE + 1,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=CLIP_VOCAB_SIZE - 2,  # SimpleTokenizer's <start_of_text>
        eos_token_id=CLIP_VOCAB_SIZE - 1,  # and <end_of_text>
        pad_token_id=0,
    )
    n_image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=n_image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision_state_dict_from_open_clip(visual), strict=True)
    model.eval()
    return model, image_processor_from_open_clip(open_clip.get_model_preprocess_cfg(clip))


def llava_input_ids(text: str, n_image_tokens: int):
    """[1, T] ids: start token, the image placeholders, then `text` in the world CLIP's BPE."""
    import torch
    from open_clip.tokenizer import SimpleTokenizer

    ids = [CLIP_VOCAB_SIZE - 2] + [IMAGE_TOKEN_ID] * n_image_tokens + SimpleTokenizer().encode(text)
    return torch.tensor([ids])
