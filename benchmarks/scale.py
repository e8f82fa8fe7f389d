"""Scaling of distributed SAE training: throughput at 1 and 2 workers, memory per worker as F grows.

Each configuration runs as real processes joined by torch.distributed (gloo, loopback), each
rank driving `SAETrainer` on its part of the layout (the per-worker loop of the Ray Train job,
without Ray's scheduling), one CPU thread per rank:

- throughput: TopK, d=256, F=8192, k=32. Strong scaling: a global batch of 2048 on 1 worker, on
  2 data-parallel workers (DDP) and on 2 latent shards; weak scaling: 1024 rows per data-parallel
  worker. samples/s over the timed steps after 2 warm-up steps, and the ratio to 1 worker.
- memory per worker: parameters, gradients and Adam moments (bytes of the tensors each rank holds
  after a step) and the peak resident memory of the rank, for F = 2^13 .. 2^17 at d=256, replicated
  (1 worker holds the SAE) vs 2 latent shards.

    .venv/bin/python benchmarks/scale.py [--steps 10] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D, K = 256, 32


def rank_main(world: int, rank: int, latent_shards: int, n_latents: int, batch: int, steps: int, init: str):
    """One rank: train `steps` steps on random rows and print its figures as JSON."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from vlsae_ray.sae import build_sae
    from vlsae_ray.train import SAETrainer
    from vlsae_ray.train.parallel import LatentShardedSAE, ParallelLayout

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    layout = ParallelLayout.create(latent_shards)
    config = build_sae({"architecture": "topk", "d_in": D, "n_latents": 64, "k": K}).config
    config = config.model_copy(update={"n_latents": n_latents})
    sae = LatentShardedSAE(config, layout) if latent_shards > 1 else build_sae(config)
    model = DistributedDataParallel(sae, process_group=layout.data_group) if layout.data_parallel > 1 else sae
    part = batch // layout.data_parallel
    g = torch.Generator().manual_seed(layout.data_index)
    x = torch.randn(4 * part, D, generator=g) + 1.0
    trainer = SAETrainer(model, total_steps=steps + 2, sample=x, layout=layout)
    for step in range(steps + 2):
        if step == 2:
            dist.barrier()
            start = time.perf_counter()
        trainer.step(x[(step % 4) * part : (step % 4 + 1) * part])
    dist.barrier()
    seconds = time.perf_counter() - start
    state = [*trainer.sae.parameters(), *[p.grad for p in trainer.sae.parameters()]]
    state += [t for s in trainer.optimizer.state.values() for t in s.values() if t.ndim > 0]
    print(
        json.dumps(
            {
                "rank": rank,
                "samples_per_second": steps * batch / seconds,
                "state_bytes": sum(t.numel() * t.element_size() for t in state),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )
    dist.destroy_process_group()


def run(world: int, latent_shards: int, n_latents: int, batch: int, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--rank",
                    str(world),
                    str(rank),
                    str(latent_shards),
                    str(n_latents),
                    str(batch),
                    str(steps),
                    f"{folder}/pg",
                ],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            for rank in range(world)
        ]
        outputs = [proc.communicate()[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"a rank failed: world={world} latent_shards={latent_shards} F={n_latents}")
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    lines = ["| run | workers | global batch | samples/s | vs 1 worker |", "| --- | --- | --- | --- | --- |"]
    results: dict = {"throughput": [], "memory": []}
    base = None
    for name, world, shards, batch in [
        ("1 worker", 1, 1, 2048),
        ("strong, data parallel", 2, 1, 2048),
        ("strong, latent shards", 2, 2, 2048),
        ("weak, data parallel", 2, 1, 4096),
    ]:
        rate = run(world, shards, 8192, batch, args.steps)[0]["samples_per_second"]
        base = base or rate
        results["throughput"].append(
            {"run": name, "workers": world, "batch": batch, "samples_per_second": rate}
        )
        lines.append(f"| {name} | {world} | {batch} | {rate:,.0f} | {rate / base:.2f} |")
        print(lines[-1], flush=True)
    lines += [
        "",
        "| F | replicated: state MiB | peak RSS MiB | 2 shards: state MiB / worker | peak RSS MiB "
        "| state ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n_latents in (2**13, 2**15, 2**17):
        one = run(1, 1, n_latents, 1024, 2)[0]
        two = max(run(2, 2, n_latents, 1024, 2), key=lambda r: r["state_bytes"])
        results["memory"].append({"n_latents": n_latents, "replicated": one, "sharded": two})
        mib = 2**20
        lines.append(
            f"| {n_latents:,} | {one['state_bytes'] / mib:.1f} | {one['peak_rss_bytes'] / mib:.0f} "
            f"| {two['state_bytes'] / mib:.1f} | {two['peak_rss_bytes'] / mib:.0f} "
            f"| {two['state_bytes'] / one['state_bytes']:.3f} |"
        )
        print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=1))
    (out / "scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(*(int(a) for a in sys.argv[2:8]), sys.argv[8])
    else:
        main()
