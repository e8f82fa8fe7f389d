"""Does training ever wait on data? Rows/s streamed from S3 vs the SAE trainer's consumption rate.

An activation dataset (d=512, float16, 32 shards of 4096 rows) is written to a SeaweedFS S3 server
on loopback. Then, one after the other on the same machine (torch on 2 threads):

- stream: `ActivationStream` (the training job's reader: a Ray Data dataset on a local Ray whose
  read tasks do the S3 GETs, checksum, safetensors decode, window shuffle and float32 conversion,
  cut into batches of 4096 in this process) over one epoch, Ray Data's start included, consuming
  nothing but the batches; after a first epoch that starts Ray's worker processes, as in a job;
- train: `SAETrainer.step` of a TopK SAE (F = 32·d = 16384, k = 32, the library's defaults)
  on in-memory batches of the same size.

The ratio stream / train says how much faster the data arrives than training uses it (goal: at
least 2). In a job the stream's read tasks read the next windows while training runs.

    .venv/bin/python benchmarks/stream.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import ActivationStream
from vlsae_ray.local_stack import SeaweedFS, connect_ray
from vlsae_ray.sae import build_sae
from vlsae_ray.train import SAETrainer

D, SHARDS, SHARD_ROWS, BATCH, TRAIN_STEPS = 512, 32, 4096, 4096, 8


def write_dataset(root: str) -> None:
    g = torch.Generator().manual_seed(0)
    store.write_dataset(root, [torch.randn(SHARD_ROWS, D, generator=g) for _ in range(SHARDS)])


def stream_rate(root: str) -> float:
    stream = ActivationStream(root, batch_size=BATCH, seed=0, window_shards=4)
    for _ in stream.epoch(0):  # warm-up
        pass
    start, rows = time.perf_counter(), 0
    for x_bd in stream.epoch(1):
        rows += x_bd.shape[0]
    return rows / (time.perf_counter() - start)


def train_rate() -> float:
    torch.manual_seed(0)
    sae = build_sae({"architecture": "topk", "d_in": D, "n_latents": 32 * D, "k": 32})
    x = torch.randn(2 * BATCH, D)
    trainer = SAETrainer(sae, total_steps=TRAIN_STEPS + 1, sample=x)
    trainer.step(x[:BATCH])  # warm-up
    start = time.perf_counter()
    for step in range(TRAIN_STEPS):
        trainer.step(x[(step % 2) * BATCH : (step % 2 + 1) * BATCH])
    return TRAIN_STEPS * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with SeaweedFS(tempfile.mkdtemp(prefix="vlsae-bench-s3-"), buckets=("bench",)):
        root = storage.join("s3://bench", "acts")
        write_dataset(root)
        connect_ray()  # after the S3 server starts, so Ray's workers get its endpoint
        streamed = stream_rate(root)
        trained = train_rate()
    result = {"stream_rows_per_second": streamed, "train_samples_per_second": trained}
    lines = [
        "| stream from S3, rows/s | SAE training, samples/s | stream / train |",
        "| --- | --- | --- |",
        f"| {streamed:,.0f} | {trained:,.0f} | {streamed / trained:.1f} |",
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream.json").write_text(json.dumps(result, indent=1))
    (out / "stream.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
