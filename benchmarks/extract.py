"""Extraction throughput: the whole Ray Data pipeline vs the bare model forward on the same images.

For each model: `run_extract` on a local Ray (list the source, decode and preprocess in CPU tasks,
the model in an actor, write fp16 shards, commit) on N world images, timed from the call to its
return, actor start and model load included; then the bare forward in this process: the same
images already preprocessed in memory, the same `Backbone.activations` call, the same batch size,
torch's default threads (the model actor's default on CPU too: its node's CPUs).
Reported: images/s of each and their ratios (goal: pipeline >= 0.8 x bare forward).

Two models: the built-in world CLIP (tiny, so the pipeline's fixed costs dominate) and open_clip
ViT-B-32 built from its config with random weights (`pretrained=None`; no download), where the
model's own compute dominates as it does for real extraction.

    .venv/bin/python benchmarks/extract.py [--models world-clip ViT-B-32] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from vlsae_ray.activations.extract import run_extract
from vlsae_ray.activations.sources import load_image, source_items
from vlsae_ray.backbones import builtin_backbone, image_preprocessor, load_backbone
from vlsae_ray.config import BackboneConfig, ExtractConfig, SourceConfig
from vlsae_ray.local_stack import connect_ray

HOOK = "visual"
# model -> (backbone, images, batch size, items per shard)
MODELS = {
    "world-clip": (builtin_backbone(), 16384, 256, 1024),
    "ViT-B-32": (BackboneConfig(model="ViT-B-32", pretrained=None), 1024, 32, 128),
}


def bare_forward(backbone: BackboneConfig, source: SourceConfig, batch_size: int) -> float:
    """Images/s of the model alone on preprocessed images in memory."""
    ids = [item["id"] for item in source_items(source)]
    preprocess = image_preprocessor(backbone)
    pixels_nchw = torch.stack([preprocess(load_image(item_id)) for item_id in ids])
    model = load_backbone(backbone)
    model.activations([HOOK], pixels=pixels_nchw[:batch_size], item_ids=ids[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        model.activations([HOOK], pixels=pixels_nchw[i : i + batch_size], item_ids=ids[i : i + batch_size])
    return len(ids) / (time.perf_counter() - start)


def pipeline(
    backbone: BackboneConfig, source: SourceConfig, batch_size: int, shard_rows: int, root: str
) -> float:
    """Images/s of `run_extract`, from the call to its return."""
    config = ExtractConfig(
        source=source,
        backbone=backbone,
        hook_points=[HOOK],
        output=root,
        shard_rows=shard_rows,
        batch_size=batch_size,
    )
    start = time.perf_counter()
    summary = run_extract(config)
    elapsed = time.perf_counter() - start
    assert summary.rows[HOOK] == source.n_items
    return source.n_items / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    connect_ray()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        # a first small job starts Ray's worker processes, as on a long-running cluster
        warm = MODELS["world-clip"]
        pipeline(warm[0], SourceConfig(n_items=64, seed=99), 32, 32, f"{root}/warm-up")
        for name in args.models:
            backbone, n_items, batch_size, shard_rows = MODELS[name]
            source = SourceConfig(n_items=n_items)
            piped = pipeline(backbone, source, batch_size, shard_rows, f"{root}/{name}")
            bare = bare_forward(backbone, source, batch_size)
            rows.append(
                {
                    "model": name,
                    "images": n_items,
                    "batch_size": batch_size,
                    "pipeline_images_per_s": round(piped, 1),
                    "bare_forward_images_per_s": round(bare, 1),
                    "ratio": round(piped / bare, 2),
                    "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg(),
                }
            )
            print(json.dumps(rows[-1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "extract.json").write_text(json.dumps(rows, indent=1))
    table = [
        "| model | images | batch | pipeline images/s | bare forward images/s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['model']} | {r['images']} | {r['batch_size']} | {r['pipeline_images_per_s']} | "
        f"{r['bare_forward_images_per_s']} | {r['ratio']} |"
        for r in rows
    ]
    (out / "extract.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
