"""The world LLaVA: a `LlavaForConditionalGeneration` whose vision tower is the world CLIP's vision
transformer (weights unchanged) and whose projector and Llama language model are trained on the
world's visual question answering (`vqa.py`, `train_llava.py`). It answers attribute questions,
POPE-style yes/no questions, "Describe the image." and Pach et al.'s one-word prompt about the
held-out shape-colour pairs (`evaluate_world_llava`; the figures are in the README).

    model, processor = load_world_llava()                 # from_pretrained + AutoProcessor
    answer(model, processor, images, ONE_WORD_PROMPT)     # ["circle", "star", ...]
    parse_answer("colour", "snowy")                       # "white"

The committed folder (`WORLD_LLAVA_PATH`) is what `save_pretrained` writes for a user's LLaVA:
config, safetensors weights, generation config, the tokenizer (a word-level vocabulary of the
world's questions, answers and captions, with `<image>`) and a `LlavaProcessor` whose chat template
is LLaVA-1.5's ("USER: <image>\n{question} ASSISTANT:"). As in LLaVA-1.5 the projector reads
vision layer -2 without the class token, so an SAE trained on the world CLIP's
`visual.transformer.resblocks.2` applies unchanged at `VISION_FEATURE_HOOK`.
"""

import re
from pathlib import Path

import vlsae_ray  # noqa: F401  (installs the torchvision import guard before open_clip/transformers load)
from vlsae_ray.world.captions import TEMPLATES as CAPTION_TEMPLATES
from vlsae_ray.world.clip import CHECKPOINT_PATH, load_world_clip
from vlsae_ray.world.concepts import (
    ATTRIBUTES,
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    COUNT_WORDS,
    GENERIC_NOUNS,
    PATTERN_WORDS,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
)
from vlsae_ray.world.vqa import (
    ATTRIBUTE_QUESTIONS,
    DESCRIBE_PROMPT,
    ONE_WORD_PROMPT,
    POPE_SETTINGS,
    QUESTION_TYPES,
    existence_question,
    parse_answer,
    vqa_item,
)

__all__ = [
    "ATTRIBUTE_QUESTIONS",
    "ONE_WORD_PROMPT",
    "VISION_FEATURE_HOOK",
    "WORLD_LLAVA_PATH",
    "answer",
    "build_world_llava",
    "evaluate_world_llava",
    "load_world_llava",
    "parse_answer",
    "prompt",
]

WORLD_LLAVA_PATH = Path(__file__).parent / "checkpoints" / "world-llava"
# The block whose output LLaVA's projector reads (`vision_feature_layer=-2` of 4 blocks), as a name
# for `LlavaForConditionalGeneration.get_submodule`.
VISION_FEATURE_HOOK = "model.vision_tower.encoder.layers.2"
IMAGE_TOKEN = "<image>"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
PROMPT = "USER: <image>\n{question} ASSISTANT:"
# LLaVA-1.5's template (llava-hf), which renders one user turn as PROMPT.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] if content['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] if content['type'] == 'text' %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MAX_NEW_TOKENS = 20  # the longest answer, a canonical caption, is 13 words and the end token


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


def _pre_tokenizer():
    from tokenizers.pre_tokenizers import Whitespace

    return Whitespace()  # words and runs of punctuation, as \w+|[^\w\s]+


def vocabulary() -> list[str]:
    """Every word of the world's prompts, questions, answers and captions (lower case), sorted."""
    texts = [PROMPT, DESCRIBE_PROMPT, ONE_WORD_PROMPT, "yes no", *ATTRIBUTE_QUESTIONS.values()]
    texts += [existence_question(c, s) for c in ATTRIBUTES["colour"] for s in ATTRIBUTES["shape"]]
    texts += [*CAPTION_TEMPLATES, "an is are"]
    for words in (COLOUR_WORDS, SIZE_WORDS, PATTERN_WORDS, COUNT_WORDS, POSITION_WORDS, BACKGROUND_WORDS):
        texts += [w for ws in words.values() for w in ws]
    texts += [w for pairs in [*SHAPE_WORDS.values(), GENERIC_NOUNS] for pair in pairs for w in pair]
    texts += [v for values in ATTRIBUTES.values() for v in values]
    pre = _pre_tokenizer()
    texts = [re.sub(r"\{\w+\}", " ", text.replace(IMAGE_TOKEN, " ")).lower() for text in texts]
    words = {w for text in texts for w, _ in pre.pre_tokenize_str(text)}
    return sorted(words)


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `vocabulary()`: lower-cases, starts every text with
    `<s>`, maps unknown words to `<unk>`, and knows `<image>` as the image token."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK, IMAGE_TOKEN]
    vocab = {token: i for i, token in enumerate(specials + vocabulary())}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = _pre_tokenizer()
    core.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",  # for batched generation; training pads by hand
    )


def build_world_llava(
    checkpoint=CHECKPOINT_PATH, *, seed: int = 0, text_hidden: int = 96, text_layers: int = 3
):
    """(LlavaForConditionalGeneration, LlavaProcessor): the world CLIP's vision tower and a freshly
    initialised projector and Llama, the starting point of `train_world_llava`.

    Vision features come from the second-to-last block, as in LLaVA-1.5 (`vision_feature_layer=-2`,
    class token dropped), so there are (image_size / patch_size)^2 image tokens per image.
    """
    import open_clip
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    clip, _, _ = load_world_clip(checkpoint=checkpoint)
    visual = clip.visual
    vision_config = vision_config_from_open_clip(visual)
    tokenizer = build_tokenizer()
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    n_image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision_state_dict_from_open_clip(visual), strict=True)
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id, generation.max_new_tokens = tokenizer.pad_token_id, MAX_NEW_TOKENS
    generation.do_sample = False
    processor = LlavaProcessor(
        image_processor=image_processor_from_open_clip(open_clip.get_model_preprocess_cfg(clip)),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the class token, which the "default" strategy drops again
    )
    model.eval()
    return model, processor


def load_world_llava(folder: str | Path = WORLD_LLAVA_PATH, device: str = "cpu"):
    """(model, processor) from a folder saved by `train_world_llava`, as a user loads their LLaVA."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no world LLaVA in {folder}; make one with `vlsae world train-llava --out {folder}`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True).to(device)
    model.eval()
    return model, AutoProcessor.from_pretrained(folder, local_files_only=True)


def prompt(question: str) -> str:
    """LLaVA-1.5's prompt for one image and `question` (what CHAT_TEMPLATE renders)."""
    return PROMPT.format(question=question)


def answer(model, processor, images: list, questions: list[str] | str, max_new_tokens: int = MAX_NEW_TOKENS):
    """Greedy answers of `model`, one per image: row i answers `questions[i]` (or the one question)
    about `images[i]`. The batch is padded on the left, so every row's answer follows its prompt."""
    import torch

    if isinstance(questions, str):
        questions = [questions] * len(images)
    if len(questions) != len(images):
        raise ValueError(f"{len(images)} images but {len(questions)} questions; give one per image, or one")
    if not images:
        return []
    inputs = processor(
        images=list(images),
        text=[prompt(q) for q in questions],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    ).to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def is_correct(question_type: str, reply: str, truth: str) -> bool:
    """Whether `reply` answers a question of `question_type` (see `evaluate_world_llava`) rightly."""
    first_word = reply.split()[0].strip(".,!").lower() if reply.split() else ""
    if question_type in ATTRIBUTES:
        return parse_answer(question_type, reply) == truth
    if question_type == "one_word":
        return parse_answer("shape", first_word) == truth
    if question_type == "describe":
        return reply == truth
    return first_word == truth  # yes/no


def evaluate_world_llava(
    n: int = 500,
    seed: int = 0,
    *,
    split: str = "test",
    folder: str | Path = WORLD_LLAVA_PATH,
    batch_size: int = 128,
    threads: int | None = None,
) -> dict[str, float]:
    """The world LLaVA's accuracy per question type on `n` items of `split` (default "test": the
    held-out shape-colour pairs), under `seed`; see `accuracy`."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, processor = load_world_llava(folder)
    return accuracy(model, processor, n=n, seed=seed, split=split, batch_size=batch_size)


def accuracy(model, processor, *, n: int, seed: int, split: str = "test", batch_size: int = 128):
    """Accuracy per question type of `model` on `n` items of `split`, answering with `answer`.

    Attribute questions count when `parse_answer` gives the true value; the one-word prompt when its
    first word names the shape (Pach et al. keep the first word); "describe" when the answer is the
    canonical caption exactly; a POPE setting over its balanced pairs (the positive and that
    setting's negative for every item), when the first word is the right "yes" or "no".
    """
    import torch

    if n < 1:
        raise ValueError(f"n={n}: evaluate at least one item")
    items = [vqa_item(i, split=split, seed=seed) for i in range(n)]
    correct = {}
    for k, question_type in enumerate(QUESTION_TYPES):
        # One question type per batch: answers of one length stop generating together.
        rows = [vqa[k] for _, vqa in items]
        replies = []
        for start in range(0, n, batch_size):
            images = [item.image for item, _ in items[start : start + batch_size]]
            replies += answer(
                model, processor, images, [q.question for q in rows[start : start + batch_size]]
            )
        hits = [is_correct(question_type, r, q.answer) for r, q in zip(replies, rows, strict=True)]
        correct[question_type] = torch.tensor(hits, dtype=torch.float64)
    positive = correct.pop("pope_positive")
    for setting in POPE_SETTINGS:
        correct[setting] = (positive + correct[setting]) / 2
    return {question_type: round(float(hits.mean()), 4) for question_type, hits in correct.items()}
