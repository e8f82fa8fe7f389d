"""Contrastive training of the world CLIP on freshly generated world items (CPU, a few minutes).

Batch `t` is items t*B .. t*B+B-1 of the training split; with `siblings=True` it is instead made
of sibling groups t*B, t*B+1, ... (see `generate_siblings`), which share every label but shape,
so InfoNCE can pair those captions with their images only by shape. (With larger shapes, a
2400-step sibling run, 2 threads, 16 min, reached held-out shape 0.37 and colour 1.0 on 2000
test items, seen-pair shape 0.66: not enough to replace the committed checkpoint.) A run is a pure
function of its arguments: same seed, steps and thread count on the same torch build give the
same checkpoint (another thread count changes the low bits). The committed checkpoint is
`train_world_clip()` with every default. One thread is the default: on a shared 2-core machine
two OpenMP threads stall each other whenever one is descheduled (we saw steps several times
slower); on an idle machine `threads=2` is faster but gives a slightly different checkpoint.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import vlsae_ray  # noqa: F401  (installs the torchvision import guard before open_clip loads)
from vlsae_ray.world.clip import CHECKPOINT_PATH, register_world_clip
from vlsae_ray.world.generator import generate_item, generate_items, generate_siblings
from vlsae_ray.world.zeroshot import zero_shot_accuracy

DEFAULT_SEED = 0
DEFAULT_STEPS = 1200


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


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _batch(step: int, batch_size: int, seed: int, image_size: int, siblings: bool) -> list:
    """The training items of step `step`: plain items, or sibling groups (the last one cut short)."""
    start = step * batch_size
    if not siblings:
        return [
            generate_item(i, split="train", seed=seed, image_size=image_size)
            for i in range(start, start + batch_size)
        ]
    items = []
    while len(items) < batch_size:  # fewer than batch_size groups, so steps never share one
        items += generate_siblings(start, split="train", seed=seed, image_size=image_size)
        start += 1
    return items[:batch_size]


def train_world_clip(
    out_path: str | Path = CHECKPOINT_PATH,
    *,
    seed: int = DEFAULT_SEED,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    warmup: int = 50,
    threads: int = 1,
    siblings: bool = False,
    log_every: int = 50,
    eval_every: int = 0,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the world CLIP from scratch with the CLIP loss and save fp16 weights to `out_path`.

    The file is a plain `{"state_dict": ...}` that open_clip's `pretrained=PATH` loads. With
    `eval_every`, held-out zero-shot colour and shape accuracy on 256 test items is logged too.
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
    heldout = generate_items(256, split="test", seed=seed + 1) if eval_every else []

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
    loss_fn = open_clip.ClipLoss()

    start, cpu_start = time.perf_counter(), time.process_time()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        items = _batch(step, batch_size, seed, image_size, siblings)
        images = pixels_to_tensor(np.stack([it.pixels for it in items]), cfg["mean"], cfg["std"])
        texts = tokenizer([it.caption for it in items])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(texts, normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100 (Radford et al. 2021, sec. 2.5)
            model.logit_scale.clamp_(0, math.log(100))
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s")
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            accuracy = zero_shot_accuracy(model, preprocess, tokenizer, heldout, ("colour", "shape"))
            model.train()
            log(f"step {step + 1} held-out zero-shot {accuracy}")
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
        "siblings": siblings,
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
