"""Training the world LLaVA's projector and language model on world VQA (CPU, minutes).

The vision tower is frozen (it is the world CLIP's), so its layer -2 patch features are computed
once for `n_images` training items; each step then runs only the projector and the Llama on
`batch_size` items with all their questions (`vqa.item_vqa`), with teacher forcing and the loss on
the answer tokens and the end token only (LLaVA's instruction tuning). The features enter exactly
where `get_image_features` puts them: the projector's output replaces the `<image>` embeddings.
An item's questions are packed behind one copy of the shared prompt start (`pack`): with
`packed_attention` and position ids each question's logits are those of its single-turn prompt
alone, bit for bit up to float rounding, while the 64 image tokens, most of a prompt, are computed
once per item instead of once per question (4.6x fewer tokens).

A run is a pure function of its arguments on one torch build and thread count. One thread is the
default: on a 2-core machine shared with other work, two OpenMP threads stalled each other on
every small op (2 to 3 s a step at load average 10, against 0.25 s with one thread). Held-out
accuracy (60 items) of an earlier run of this recipe, 1500 steps, climbed as shape 0.90, 0.93,
0.95 and colour 0.63, 0.88, 0.95 at steps 500, 1000, 1500; the yes/no questions stayed at chance
until no training question named a held-out pair (see `vqa.py`). The committed model is
`train_world_llava()` with every default: 389 s wall, 375 s CPU, on a 2-core machine with other
work running.
"""

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import vlsae_ray  # noqa: F401  (installs the torchvision import guard before transformers loads)
from vlsae_ray.world.llava import IMAGE_TOKEN, WORLD_LLAVA_PATH, accuracy, build_world_llava, prompt
from vlsae_ray.world.train import pixels_to_tensor
from vlsae_ray.world.vqa import QUESTION_TYPES, vqa_item

# Loss weight of each question type. "yes" weighs as much as the three "no"s together. The
# popular negative (the item's colour, another shape) weighs most: it is the only question that
# checks the shape a yes/no question names, and at equal weights (positive 1.5, each negative 0.5,
# 2 layers) the model answered "yes" to it on every image, training ones too.
QUESTION_WEIGHTS = {t: 1.0 for t in QUESTION_TYPES} | {
    "pope_positive": 2.0,
    "pope_random": 0.25,
    "pope_popular": 1.5,
    "pope_adversarial": 0.25,
}
DEFAULT_STEPS = 2000
DRAW_STREAM = 4  # keeps the batches' random draws apart from the items'


@dataclass(frozen=True)
class LlavaTrainResult:
    folder: Path
    seed: int
    n_images: int
    steps: int
    batch_size: int
    wall_time_s: float
    cpu_time_s: float  # this process's CPU time over all threads
    folder_bytes: int
    first_loss: float
    final_loss: float


def vision_features(model, pixels_bchw, batch_size: int = 256):
    """[B, n_image_tokens, d] what LLaVA's projector reads: vision layer -2 without the class token."""
    import torch

    config, tower = model.config, model.model.vision_tower
    out = []
    with torch.no_grad():
        for chunk in pixels_bchw.split(batch_size):
            hidden = tower(chunk, output_hidden_states=True).hidden_states[config.vision_feature_layer]
            out.append(hidden[:, 1:])
    return torch.cat(out)


def prompt_ids(tokenizer, n_image_tokens: int, question: str) -> list[int]:
    """The ids of LLaVA's single-turn prompt for `question`, its image expanded to its tokens."""
    return tokenizer(prompt(question).replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens)).input_ids


def pack(prefix: list[int], segments: list[list[int]]):
    """One row holding several single-turn samples that share their first tokens (`prefix`).

    Returns (ids, position ids, owner: 0 for a prefix token, s for one of segment s). Each
    segment's positions continue from the prefix's, and under `packed_attention` it sees only the
    prefix and itself, so every segment gets exactly the logits of prefix + segment alone, while
    the image tokens, most of a sample, are computed once for all of an image's questions.
    """
    ids, positions, owner = list(prefix), list(range(len(prefix))), [0] * len(prefix)
    for s, segment in enumerate(segments, start=1):
        ids += segment
        positions += range(len(prefix), len(prefix) + len(segment))
        owner += [s] * len(segment)
    return ids, positions, owner


def packed_attention(owner_bt):
    """[B, 1, T, T] bool: token i sees token j <= i of the shared prefix or of its own segment."""
    import torch

    t = owner_bt.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = (owner_bt[:, :, None] == owner_bt[:, None, :]) | (owner_bt[:, None, :] == 0)
    return (causal & same)[:, None]


def _padded(rows: list[list], value):
    """[B, T] tensor of `rows`, each filled out on the right with `value`."""
    import torch

    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then a linear fall to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (steps - step) / (steps - warmup)


def train_world_llava(
    out_dir: str | Path = WORLD_LLAVA_PATH,
    *,
    seed: int = 0,
    n_images: int = 6000,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 16,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    warmup: int = 100,
    text_hidden: int = 96,
    text_layers: int = 3,
    threads: int = 1,
    log_every: int = 100,
    eval_every: int = 0,
    eval_n: int = 100,
    log: Callable[[str], None] = print,
) -> LlavaTrainResult:
    """Train the world LLaVA from `seed` and save it (model and processor) to `out_dir`."""
    import torch

    if n_images < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"n_images={n_images}, steps={steps}, batch_size={batch_size}: each must be >= 1")
    if not 0 <= warmup < steps:
        raise ValueError(f"warmup={warmup} must be at least 0 and below steps={steps}")
    torch.set_num_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    model, processor = build_world_llava(seed=seed, text_hidden=text_hidden, text_layers=text_layers)
    tokenizer, n_image_tokens = processor.tokenizer, model.config.image_seq_length
    items = [vqa_item(i, split="train", seed=seed) for i in range(n_images)]
    image_processor = processor.image_processor
    pixels = pixels_to_tensor(
        np.stack([item.pixels for item, _ in items]), image_processor.image_mean, image_processor.image_std
    )
    features = vision_features(model, pixels)
    del pixels
    log(f"vision features of {n_images} items {tuple(features.shape)} in {time.perf_counter() - start:.0f}s")
    prefix = prompt_ids(tokenizer, n_image_tokens, "")[: 3 + n_image_tokens]  # <s> USER : <image>...
    segments: dict[tuple[str, str], tuple[list[int], list[int], float]] = {}

    def segment(q) -> tuple[list[int], list[int], float]:
        """(ids after the prefix, each one's target: the next answer token or -100, loss weight)."""
        key = (q.question, q.answer)
        if key not in segments:
            ids = prompt_ids(tokenizer, n_image_tokens, q.question)
            if ids[: len(prefix)] != prefix:
                raise AssertionError(f"the prompt of {q.question!r} does not start with the image")
            ids = ids[len(prefix) :]
            reply = tokenizer(q.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            targets = [-100] * (len(ids) - 1) + reply + [-100]  # position t predicts token t + 1
            segments[key] = (ids + reply, targets, QUESTION_WEIGHTS[q.question_type])
        return segments[key]

    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    no_decay = [p for p in trainable if p.ndim < 2]
    decay = [p for p in trainable if p.ndim >= 2]
    optimizer = torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    rng = np.random.default_rng([seed, DRAW_STREAM])
    embed, projector = model.get_input_embeddings(), model.model.multi_modal_projector
    image_token_id = model.config.image_token_id
    model.train()
    first_loss = loss = float("nan")
    for step in range(steps):
        picks = rng.integers(n_images, size=batch_size)
        rows, targets, weights = [], [], []
        for i in picks.tolist():
            parts = [segment(q) for q in items[i][1]]
            rows.append(pack(prefix, [ids for ids, _, _ in parts]))
            targets.append([-100] * len(prefix) + [t for _, ts, _ in parts for t in ts])
            weights.append([0.0] * len(prefix) + [w * (t != -100) for _, ts, w in parts for t in ts])
        input_ids = _padded([ids for ids, _, _ in rows], tokenizer.pad_token_id)
        positions = _padded([pos for _, pos, _ in rows], 0)
        owner = _padded([own for _, _, own in rows], -1)  # padding sees the prefix and padding only
        target, weight = _padded(targets, -100), _padded(weights, 0.0)
        image_embeds = projector(features[torch.from_numpy(picks)])
        image_positions = (input_ids == image_token_id).unsqueeze(-1).expand(-1, -1, image_embeds.shape[-1])
        inputs_embeds = embed(input_ids).masked_scatter(image_positions, image_embeds)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        logits = model(
            inputs_embeds=inputs_embeds, attention_mask=packed_attention(owner), position_ids=positions
        ).logits
        token_loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none"
        )
        batch_loss = (token_loss * weight.flatten()).sum() / weight.sum()
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        loss = batch_loss.item()
        if step == 0:
            first_loss = loss
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"step {step}/{steps} loss {loss:.4f} {time.perf_counter() - start:.0f}s")
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            log(f"step {step + 1} held-out accuracy {accuracy(model, processor, n=eval_n, seed=seed + 1)}")
            model.train()
    model.eval()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    meta = {
        "seed": seed,
        "n_images": n_images,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup": warmup,
        "text_hidden": text_hidden,
        "text_layers": text_layers,
        "threads": threads,
    }
    (out_dir / "world_training.json").write_text(json.dumps(meta, indent=1) + "\n")
    result = LlavaTrainResult(
        folder=out_dir,
        seed=seed,
        n_images=n_images,
        steps=steps,
        batch_size=batch_size,
        wall_time_s=wall,
        cpu_time_s=cpu,
        folder_bytes=sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()),
        first_loss=first_loss,
        final_loss=loss,
    )
    log(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}))
    return result
