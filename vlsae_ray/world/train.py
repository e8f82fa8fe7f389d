"""Contrastive training of the world CLIP on freshly generated world items (CPU, minutes).

Batch `t` is items t*B .. t*B+B-1 of the training split. The loss is CLIP's, with hard-negative
captions (`_hard_negatives`) as extra columns: without them the tower barely learns shape, which
in-batch negatives almost never need (1200 steps: held-out shape 0.18, seen-pair shape about
0.46; batches of items that differ only by shape reached 0.37 held-out after 2400 steps). A run
is a pure function of its arguments: same seed, steps and thread count on the same torch build
give the same checkpoint (another thread count changes the low bits). The committed checkpoint is
`train_world_clip()` with every default: 2000 steps on 2 threads, 19.5 minutes on an idle 2-core
machine (0.50 to 0.62 s a step, as that machine's speed varied); held-out shape 0.9455 on 2000
items, where 1800 steps gave 0.897 and 2400 gave 0.949.

The learning rate is held until the last quarter, then falls linearly (warmup-stable-decay):
held-out shape grew with the learning rate spent more than with the steps taken. Under a cosine
schedule, 3200 steps reached 0.90 and 1600 steps only 0.72, though at step 1600 the longer run
already had 0.82. Held at 2e-3 (with the 2-layer text tower), held-out shape on 256 items was
0.73 at step 1200 and 0.86 at 1600, where cosine (4 layers) had 0.61 and 0.82; the decay adds the
rest. The text tower has 2 layers because captions are short templates and 4 made each step 1.4x
as long (0.67 s against 0.47 s). On a loaded machine two OpenMP threads stall each other whenever
one is descheduled; `threads=1` is then steadier but gives a slightly different checkpoint.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import vlsae_ray  # noqa: F401  (installs the torchvision import guard before open_clip loads)
from vlsae_ray.world.captions import hard_negative
from vlsae_ray.world.clip import CHECKPOINT_PATH, register_world_clip
from vlsae_ray.world.concepts import ATTRIBUTES, combos
from vlsae_ray.world.generator import generate_items
from vlsae_ray.world.zeroshot import zero_shot_accuracy

DEFAULT_SEED = 0
DEFAULT_STEPS = 2000


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    seed: int
    steps: int
    batch_size: int
    wall_time_s: float
    cpu_time_s: float  # this process's CPU time over all threads; wall time is inflated by other load
    checkpoint_bytes: int
    final_loss: float


def pixels_to_tensor(pixels_bhwc: np.ndarray, mean, std):
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W], as open_clip's preprocess does at 64 px."""
    import torch

    x = torch.from_numpy(pixels_bhwc).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _lr_at(step: int, steps: int, lr: float, warmup: int, cooldown: float) -> float:
    """Warmup-stable-decay: linear warmup, `lr` held, then a linear fall to 0 over the last
    `cooldown` fraction of the steps."""
    decay_start = steps - cooldown * steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if step < decay_start:
        return lr
    return lr * (steps - step) / (steps - decay_start)


NEGATIVE_STREAM = 2  # keeps the hard negatives' random draws apart from the items'
OTHER_ATTRIBUTES = ("colour", "size", "pattern", "position", "background")


def _hard_negatives(items: list, step: int, seed: int) -> list[str]:
    """Per item, its caption with the shape swapped to every other shape the training split shows
    in its colour, and with one other attribute swapped (each only when the caption names it).

    In-batch negatives almost always differ in colour, count or background too, so the plain CLIP
    loss barely rewards seeing shape; captions that differ only by shape make each image's loss a
    classification of its shape. Shapes never seen in the item's colour are left out: "not a
    triangle" on every red image would teach that red things are never triangles, which the
    held-out pairs contradict.
    """
    seen = set(combos("train"))
    rng = np.random.default_rng([seed, step, NEGATIVE_STREAM])
    negatives = []
    for it in items:
        shape, colour = it.labels["shape"], it.labels["colour"]
        shapes = [s for s in ATTRIBUTES["shape"] if s != shape and (s, colour) in seen]
        other = OTHER_ATTRIBUTES[rng.integers(len(OTHER_ATTRIBUTES))]
        swaps = [("shape", s) for s in shapes] + [(other, None)]
        for attribute, value in swaps:
            negative = hard_negative(it.caption, it.labels, attribute, rng, value)
            if negative is not None:
                negatives.append(negative)
    return negatives


def _encode_text(model, tokens_bt):
    """`model.encode_text(tokens_bt, normalize=True)`, without the padding.

    The text tower's attention is causal and CLIP pools at the end token, so the padding after it
    changes nothing; yet captions average 13 of the 32 tokens, so padding was most of the tower's
    work. Each group of captions of one length is cut to that length.
    """
    import torch
    import torch.nn.functional as F
    from open_clip.transformer import text_global_pool

    lengths = tokens_bt.argmax(dim=-1) + 1  # the end token has the largest id
    # One lookup for all: each lookup's backward writes a gradient the size of the vocabulary.
    embedded_btd = model.token_embedding(tokens_bt) + model.positional_embedding
    rows, pooled = [], []
    for length in lengths.unique().tolist():
        group = (lengths == length).nonzero().squeeze(1)
        tokens = tokens_bt[group, :length]
        x = model.transformer(embedded_btd[group, :length], attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        rows.append(group)
        pooled.append(text_global_pool(x, tokens, model.text_pool_type))
    x = torch.cat(pooled)[torch.cat(rows).argsort()] @ model.text_projection
    return F.normalize(x, dim=-1)


def _clip_loss(image_features, text_features, negative_features, logit_scale):
    """CLIP's symmetric InfoNCE, with the hard-negative captions as extra columns for each image."""
    import torch
    import torch.nn.functional as F

    labels = torch.arange(len(image_features))
    per_image = logit_scale * image_features @ torch.cat([text_features, negative_features]).T
    per_text = logit_scale * text_features @ image_features.T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def train_world_clip(
    out_path: str | Path = CHECKPOINT_PATH,
    *,
    seed: int = DEFAULT_SEED,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    warmup: int = 100,
    cooldown: float = 0.25,
    threads: int = 2,
    hard_negatives: bool = True,
    log_every: int = 50,
    eval_every: int = 0,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the world CLIP from scratch with the CLIP loss and save fp16 weights to `out_path`.

    The file is a plain `{"state_dict": ...}` that open_clip's `pretrained=PATH` loads. With
    `eval_every`, zero-shot colour and shape accuracy on 256 unseen items of seen pairs and 256 of
    held-out pairs is logged too.
    """
    import open_clip
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    name = register_world_clip()
    model = open_clip.create_model(name)
    model.train()
    cfg = open_clip.get_model_preprocess_cfg(model)
    tokenizer = open_clip.get_tokenizer(name)
    image_size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    preprocess = open_clip.image_transform(image_size, is_train=False, mean=cfg["mean"], std=cfg["std"])
    splits = ("train", "test") if eval_every else ()
    probes = {split: generate_items(256, split=split, seed=seed + 1) for split in splits}

    # Same split of decayed parameters as open_clip's own training script.
    no_decay = [
        p for n, p in model.named_parameters() if p.ndim < 2 or "ln" in n or "bias" in n or "logit" in n
    ]
    decay = [p for n, p in model.named_parameters() if not any(p is q for q in no_decay)]
    optimizer = torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    start, cpu_start = time.perf_counter(), time.process_time()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        items = generate_items(batch_size, seed=seed, start=step * batch_size, image_size=image_size)
        images = pixels_to_tensor(np.stack([it.pixels for it in items]), cfg["mean"], cfg["std"])
        texts = [it.caption for it in items] + (_hard_negatives(items, step, seed) if hard_negatives else [])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup, cooldown)
        image_features = model.encode_image(images, normalize=True)
        text_features = _encode_text(model, tokenizer(texts))
        text_features, negative_features = text_features[:batch_size], text_features[batch_size:]
        loss = _clip_loss(image_features, text_features, negative_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100 (Radford et al. 2021, sec. 2.5)
            model.logit_scale.clamp_(0, math.log(100))
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s")
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            for split, items in probes.items():
                accuracy = zero_shot_accuracy(model, preprocess, tokenizer, items, ("colour", "shape"))
                log(f"step {step + 1} zero-shot on {split} items {accuracy}")
            model.train()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half() for k, v in model.state_dict().items()}  # fp16 halves the file
    meta = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "threads": threads,
        "hard_negatives": hard_negatives,
    }
    torch.save({"state_dict": state, "world_training": meta}, out_path)
    return TrainResult(
        checkpoint=out_path,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        wall_time_s=wall,
        cpu_time_s=cpu,
        checkpoint_bytes=out_path.stat().st_size,
        final_loss=float(loss.item()),
    )
