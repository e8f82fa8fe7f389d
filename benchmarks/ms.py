"""Monosemanticity Score: this project's linear-time MS against the O(N^2) pairwise definition,
and the streamed Ray Data map-reduce over N = 1,000,000 images on a SeaweedFS S3 server.

Part 1 (in memory, one process): `vlsae_ray.eval.monosemanticity_score` vs Pach et al.'s pairwise
sum over image pairs n < m, vectorised per [block x block] tile of pairs but still O(N^2 F), on
the same random activations and embeddings; reports the max abs difference and the speed ratio.
Part 2: N rows of F neurons and D embedding dimensions written as float16 shards to a local
SeaweedFS S3 server, then `monosemanticity_map_reduce` (two Ray Data passes) reads them back;
reports rows/s (both passes, end to end, excluding the write).

    .venv/bin/python benchmarks/ms.py [--sizes 2000 10000] [--stream-rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.eval import monosemanticity_score
from vlsae_ray.eval.dataset_pass import monosemanticity_map_reduce
from vlsae_ray.local_stack import SeaweedFS, connect_ray

F_PAIRWISE, D = 256, 64
F_STREAM, SHARD_ROWS = 1024, 16384


def pairwise_ms(a_nf: torch.Tensor, e_nd: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """MS_k = Σ_{n<m} ã_n ã_m cos(e_n, e_m) / Σ_{n<m} ã_n ã_m, summed over every pair n < m."""
    a_nf, e_nd = a_nf.double(), e_nd.double()
    lo_f, hi_f = a_nf.min(0).values, a_nf.max(0).values
    norm_nf = (a_nf - lo_f) / torch.where(hi_f > lo_f, hi_f - lo_f, 1.0)
    unit_nd = torch.nn.functional.normalize(e_nd, dim=-1)
    n = a_nf.shape[0]
    numerator_f = torch.zeros(a_nf.shape[1], dtype=torch.float64)
    denominator_f = torch.zeros_like(numerator_f)
    for i in range(0, n, block):
        for j in range(i, n, block):
            rows, cols = torch.arange(i, min(i + block, n)), torch.arange(j, min(j + block, n))
            pair_ij = (rows[:, None] < cols[None, :]).double()  # only pairs n < m
            cos_ij = unit_nd[rows] @ unit_nd[cols].T
            numerator_f += (norm_nf[rows] * ((cos_ij * pair_ij) @ norm_nf[cols])).sum(0)
            denominator_f += (norm_nf[rows] * (pair_ij @ norm_nf[cols])).sum(0)
    valid_f = (hi_f > lo_f) & (denominator_f > 0)
    return torch.where(valid_f, numerator_f / denominator_f, torch.nan).float()


def random_data(n: int, f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # sparse, non-negative activations like SAE latents; embeddings with a few clusters
    a_nf = torch.relu(torch.randn(n, f, generator=g) - 1.0)
    centres = torch.randn(8, D, generator=g)
    e_nd = centres[torch.randint(0, 8, (n,), generator=g)] + torch.randn(n, D, generator=g)
    return a_nf, e_nd


def compare(n: int) -> dict:
    a_nf, e_nd = random_data(n, F_PAIRWISE, seed=n)
    start = time.perf_counter()
    ours = monosemanticity_score(a_nf, e_nd)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = pairwise_ms(a_nf, e_nd)
    pairwise_s = time.perf_counter() - start
    assert torch.equal(ours.isnan(), reference.isnan())
    return {
        "n": n,
        "f": F_PAIRWISE,
        "d": D,
        "max_abs_difference": float((ours - reference).abs().nan_to_num(0).max()),
        "ours_s": ours_s,
        "pairwise_s": pairwise_s,
        "speedup": pairwise_s / ours_s,
    }


def write_stream_dataset(root: str, n: int) -> tuple[str, str]:
    activations, embeddings = storage.join(root, "acts"), storage.join(root, "emb")
    ids = [f"item-{i}" for i in range(n)]
    for uri, width, hook in ((activations, F_STREAM, "h"), (embeddings, D, "visual")):
        manifest = store.Manifest(
            d=width, dtype="float16", model="bench", hook_point=hook, token="cls",
            shard_rows=SHARD_ROWS, items=n, listing=store.listing_digest(ids),
        )  # fmt: skip
        for index, start in enumerate(range(0, n, SHARD_ROWS)):
            rows = min(SHARD_ROWS, n - start)
            a_nf, e_nd = random_data(rows, F_STREAM, seed=index)  # same seed: the two datasets pair up
            x = (a_nf if width == F_STREAM else e_nd).half()
            record = store.write_shard(
                uri, index, x, ids[start : start + rows], torch.zeros(rows, dtype=torch.int32)
            )
            manifest = store.commit(uri, manifest, [record])
    return activations, embeddings


def stream(n: int) -> dict:
    with SeaweedFS(tempfile.mkdtemp(prefix="vlsae-bench-s3-"), buckets=("bench",)):
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        connect_ray()
        start = time.perf_counter()
        activations, embeddings = write_stream_dataset("s3://bench/ms", n)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        ms_f, _ = monosemanticity_map_reduce(activations, embeddings)
        mapreduce_s = time.perf_counter() - start
        import ray

        ray.shutdown()
    return {
        "n": n,
        "f": F_STREAM,
        "d": D,
        "shard_rows": SHARD_ROWS,
        "write_s": write_s,
        "map_reduce_s": mapreduce_s,
        "rows_per_s": n / mapreduce_s,
        "scored_neurons": int((~ms_f.isnan()).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[2000, 10000])
    parser.add_argument("--stream-rows", type=int, default=1_000_000, help="0: skip the streamed part")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"pairwise": [compare(n) for n in args.sizes]}
    for row in results["pairwise"]:
        print(json.dumps(row), flush=True)
    if args.stream_rows:
        results["stream"] = stream(args.stream_rows)
        print(json.dumps(results["stream"]), flush=True)


if __name__ == "__main__":
    main()
