"""SAE training throughput and quality, side by side with the peers' own training code.

One process, one synthetic workload (planted sparse features, `vlsae_ray.sae.synthetic`), the same
rows in the same order for every trainer, 2 CPU threads. For each trainer: training samples/s,
eval FVU, L0, dead fraction (latents that never fire on the eval rows), feature recovery
(true features matched by a decoder column at cosine > 0.9), and samples/s divided by the
encoder-GEMM bound: measured dense fp32 GEMM FLOP/s / (2 d F), the cost of the forward encoder
alone. The GEMM is measured right before each trainer, so each ratio uses the load of its own time.

    .venv-bench/bin/python benchmarks/sae_train.py [--samples 262144] [--out benchmarks/results]

With both "vlsae_ray topk" and "vlsae_ray topk, bf16" (`training.precision: bf16`) in the run, the
results end with bf16's eval FVU and samples/s as ratios of fp32's, from the same rows and seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

import vlsae_ray  # noqa: F401  (its torchvision guard, before the peers import transformers)
from vlsae_ray.sae import build_sae
from vlsae_ray.sae.synthetic import planted_features, recovered_fraction
from vlsae_ray.train import fit_local

D, F, K, BATCH, N_TRUE, ACTIVE = 512, 8192, 32, 4096, 4096, 16
PEER_LR = 4e-4


def gemm_flops(threads_batch: int = BATCH) -> float:
    x, w = torch.randn(threads_batch, D), torch.randn(F, D)
    x @ w.T
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        x @ w.T
        best = min(best, time.perf_counter() - start)
    return 2 * threads_batch * D * F / best


def batches(x_nd: torch.Tensor, seed: int):
    order = torch.randperm(len(x_nd), generator=torch.Generator().manual_seed(seed))
    return [x_nd[order[i : i + BATCH]] for i in range(0, len(x_nd) - BATCH + 1, BATCH)]


# -- trainers: each returns (decoder rows [F, d], encode_decode(x) -> (x_hat, z)) -------------------


def train_ours(x_nd, seed, precision="fp32", **options):
    torch.manual_seed(seed)
    sae = build_sae({"architecture": "topk", "d_in": D, "n_latents": F, "k": K, **options})
    fit_local(sae, x_nd, batch_size=BATCH, epochs=1, seed=seed, precision=precision)
    sae.eval()

    def run(x):
        x_hat, z, _ = sae(x)
        return x_hat, z

    return sae.W_dec_fd.detach(), run


def train_ours_shortlist(x_nd, seed):
    """Our TopK with its one non-default option: the bf16 encoder shortlist (exact top-k values)."""
    return train_ours(x_nd, seed, encoder_shortlist=8)


def train_ours_bf16(x_nd, seed):
    """Our TopK with `precision: bf16`: bf16 encoder GEMM, selection and decode, fp32 weights and Adam."""
    return train_ours(x_nd, seed, precision="bf16")


def train_ours_batchtopk(x_nd, seed):
    torch.manual_seed(seed)
    sae = build_sae({"architecture": "batchtopk", "d_in": D, "n_latents": F, "k": K})
    fit_local(sae, x_nd, batch_size=BATCH, epochs=1, seed=seed)
    sae.eval()

    def run(x):
        x_hat, z, _ = sae(x)
        return x_hat, z

    return sae.W_dec_fd.detach(), run


def train_sparsify(x_nd, seed):
    """sparsify's SparseCoder (its fused encoder and sparse decoder) stepped as its Trainer does.

    Its `Trainer` drives a Hugging Face model over a token dataset through hooks; with in-memory
    activations the loop below is that Trainer's step for the "fvu" loss: Adam with linear warm-up
    then decay (`get_linear_schedule_with_warmup`), b_dec at the first batch's mean, unit-norm
    decoder and parallel-gradient removal, dead-latent counting.
    """
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K))
    steps = len(x_nd) // BATCH
    optimizer = torch.optim.Adam(sae.parameters(), lr=PEER_LR)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    for step, batch in enumerate(batches(x_nd, seed)):
        if step == 0:
            sae.b_dec.data = batch.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(batch)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    sae.set_decoder_norm_to_unit_norm()

    def run(x):
        out = sae(x)
        z = torch.zeros(len(x), F).scatter(1, out.latent_indices, out.latent_acts)
        return out.sae_out, z

    return sae.W_dec.detach(), run


def train_dictionary_learning(x_nd, seed):
    """dictionary_learning's `trainSAE` with its TopKTrainer (AutoEncoderTopK, AuxK, its schedule)."""
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from dictionary_learning.training import trainSAE

    steps = len(x_nd) // BATCH
    config = {
        "trainer": TopKTrainer,
        "dict_class": AutoEncoderTopK,
        "steps": steps,
        "activation_dim": D,
        "dict_size": F,
        "k": K,
        "layer": 0,
        "lm_name": "synthetic",
        "lr": PEER_LR,
        "warmup_steps": max(1, steps // 20),  # its default of 1000 is longer than the whole run
        "seed": seed,
        "device": "cpu",
    }
    with tempfile.TemporaryDirectory() as save_dir:  # trainSAE returns nothing; it saves the final ae.pt
        trainSAE(
            data=iter(batches(x_nd, seed)),
            trainer_configs=[config],
            steps=steps,
            save_dir=save_dir,
            device="cpu",
        )
        ae = AutoEncoderTopK.from_pretrained(f"{save_dir}/trainer_0/ae.pt", device="cpu")

    def run(x):
        x_hat, z = ae(x, output_features=True)
        return x_hat, z

    return ae.decoder.weight.detach().T, run


def train_overcomplete(x_nd, seed):
    """overcomplete's `train_sae` with its TopKSAE and its TopK loss with the auxiliary term."""
    from overcomplete.sae import TopKSAE, train_sae
    from overcomplete.sae.losses import top_k_auxiliary_loss

    torch.manual_seed(seed)
    sae = TopKSAE(D, nb_concepts=F, top_k=K, device="cpu")
    optimizer = torch.optim.Adam(sae.parameters(), lr=PEER_LR)
    train_sae(sae, batches(x_nd, seed), top_k_auxiliary_loss, optimizer, nb_epochs=1, monitoring=0)

    def run(x):
        _, z, x_hat = sae(x)
        return x_hat, z

    return sae.get_dictionary().detach(), run


TRAINERS = {
    "vlsae_ray topk": train_ours,
    "vlsae_ray topk, bf16 shortlist": train_ours_shortlist,
    "vlsae_ray topk, bf16": train_ours_bf16,
    "vlsae_ray batchtopk": train_ours_batchtopk,
    "sparsify": train_sparsify,
    "dictionary_learning": train_dictionary_learning,
    "overcomplete": train_overcomplete,
}


@torch.no_grad()
def evaluate(run, decoder_fd, eval_nd, features_md):
    sq_err, fired_f, active = 0.0, torch.zeros(F, dtype=torch.bool), 0
    for x in eval_nd.split(2048):
        x_hat, z = run(x)
        sq_err += float((x - x_hat).pow(2).sum())
        fired_f |= (z != 0).any(0)
        active += int((z != 0).sum())
    return {
        "fvu": sq_err / float((eval_nd - eval_nd.mean(0)).pow(2).sum()),
        "l0": active / len(eval_nd),
        "dead_fraction": 1 - float(fired_f.float().mean()),
        "recovered": recovered_fraction(features_md, decoder_fd.float()),
    }


def markdown_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['trainer']} | did not run: {r['error']} | | | | | | |"
    return (
        f"| {r['trainer']} | {r['samples_per_s']:.0f} | {r['gemm_gflops']:.0f} | {r['ratio_to_bound']:.2f} "
        f"| {r['fvu']:.3f} | {r['l0']:.1f} | {r['dead_fraction']:.3f} | {r['recovered']:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=262_144, help="training rows (one epoch)")
    parser.add_argument("--eval-samples", type=int, default=16_384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=sorted(TRAINERS), help="run these trainers only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = planted_features(args.samples + args.eval_samples, D, N_TRUE, active=ACTIVE, seed=args.seed)
    train_nd, eval_nd = data.x_nd[: args.samples], data.x_nd[args.samples :]
    rows = []
    for name in args.only or TRAINERS:
        try:  # a peer that cannot import or run here is reported, not fatal, and the others still run
            rows.append(run_trainer(name, train_nd, eval_nd, data.features_md, args.seed))
        except Exception as error:
            rows.append({"trainer": name, "error": f"{type(error).__name__}: {error}"})
        print(json.dumps(rows[-1]), flush=True)
        write_results(rows, args)  # after every trainer, so a crash later keeps what was measured
    print((args.out / "sae_train.md").read_text())


def run_trainer(name, train_nd, eval_nd, features_md, seed) -> dict:
    flops = gemm_flops()
    start = time.perf_counter()
    decoder_fd, run = TRAINERS[name](train_nd, seed)
    seconds = time.perf_counter() - start
    samples_per_s = (len(train_nd) // BATCH) * BATCH / seconds
    return {
        "trainer": name,
        "samples_per_s": samples_per_s,
        "gemm_gflops": flops / 1e9,
        "ratio_to_bound": samples_per_s / (flops / (2 * D * F)),
        "load_average_1min": os.getloadavg()[0],  # other processes on the same cores
        **evaluate(run, decoder_fd, eval_nd, features_md),
    }


def write_results(rows: list[dict], args) -> None:
    table = [
        f"workload: d={D}, F={F}, k={K}, batch {BATCH}, {args.samples} samples (1 epoch), "
        f"{N_TRUE} planted features (~{ACTIVE} on per sample, power law), noise FVU 0.08, "
        f"{args.threads} threads, seed {args.seed}",
        "",
        "| trainer | samples/s | GEMM GFLOP/s | ratio to encoder-GEMM bound "
        "| eval FVU | L0 | dead | recovered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table += [markdown_row(r) for r in rows]
    by_name = {r["trainer"]: r for r in rows if "error" not in r}
    if {"vlsae_ray topk", "vlsae_ray topk, bf16"} <= by_name.keys():
        fp32, bf16 = by_name["vlsae_ray topk"], by_name["vlsae_ray topk, bf16"]
        table += [
            "",
            f"bf16 / fp32 (topk): eval FVU ratio {bf16['fvu'] / fp32['fvu']:.4f}"
            f" ({bf16['fvu']:.4f} / {fp32['fvu']:.4f}), samples/s ratio"
            f" {bf16['samples_per_s'] / fp32['samples_per_s']:.2f}",
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sae_train.json").write_text(json.dumps(rows, indent=2))
    (args.out / "sae_train.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
