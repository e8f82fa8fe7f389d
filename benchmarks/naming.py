"""Naming on the concept world's ground truth: the label job's methods side by side, and the
calibration of `activations` confidences.

The SAE is the demo's recipe (world CLIP block-2 CLS activations, 8 x d latents, k = 40,
lr 8e-4) trained on the world's default seed and split (seed 1, train). Each method names it
through `run_label` on a local Ray with the world vocabulary, on that data and on a held-out seed
and split (seed 2, test: (shape, colour) pairs never seen in training). A name is right when at
least 8 of the latent's 9 top images hold its concept (`ground_truth.held_names`); the high-MS
latents are the quarter of latents with a full top-9 with the highest MS; chance is the rate of a
uniformly random vocabulary name being right.

`--fit` fits `naming.CALIBRATION` (a logistic regression of right on the name's top share, on every
latent with a full top-9 of the default seed) and prints it; the reliability tables check it, on
the held-out seed too.

    .venv/bin/python benchmarks/naming.py [--fit] [--items 2048]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from vlsae_ray.activations import store
from vlsae_ray.backbones import Backbone, builtin_backbone
from vlsae_ray.config import LabelConfig
from vlsae_ray.eval import monosemanticity_score
from vlsae_ray.interpret import read_catalog, run_label
from vlsae_ray.interpret.ground_truth import held_names, reliability
from vlsae_ray.interpret.naming import (
    PatternSums,
    TextEncoder,
    concept_embeddings,
    in_heldout_fold,
    load_vocabulary,
    specific_names,
    top_share,
    zero_shot_log_probability,
)
from vlsae_ray.local_stack import connect_ray
from vlsae_ray.sae import build_sae
from vlsae_ray.train import fit_local
from vlsae_ray.world import generate_items

BLOCK, EMBEDDING, TOP = "visual.transformer.resblocks.2", "visual", 9
METHODS = ("top_images", "clip_dissect", "activations")


def world_data(n: int, seed: int, split: str):
    """(ids, block-2 CLS activations, image embeddings) of n world items."""
    items = generate_items(n, seed=seed, split=split)
    backbone = Backbone(builtin_backbone())
    with torch.no_grad():
        pixels = torch.stack([backbone.preprocess(item.image) for item in items])
        acts = backbone.activations([BLOCK, EMBEDDING], pixels=pixels, item_ids=[item.id for item in items])
    return [item.id for item in items], acts[BLOCK].values, acts[EMBEDDING].values


def demo_recipe_sae(x_nd: torch.Tensor):
    sae = build_sae({"architecture": "topk", "d_in": x_nd.shape[1], "n_latents": 8 * x_nd.shape[1], "k": 40})
    fit_local(sae, x_nd, batch_size=256, epochs=10, seed=0, lr=8e-4)
    return sae


def write(uri: str, x_nd: torch.Tensor, ids: list[str], shard_rows: int = 512) -> str:
    parts = [slice(start, start + shard_rows) for start in range(0, len(ids), shard_rows)]
    zeros = torch.zeros(len(ids))
    records = [store.write_shard(uri, i, x_nd[p], ids[p], zeros[p]) for i, p in enumerate(parts)]
    manifest = store.Manifest(
        d=x_nd.shape[1], dtype="float32", model="world-clip", hook_point="benchmark", token="cls",
        source={}, shard_rows=shard_rows, items=len(ids),
    )  # fmt: skip
    store.commit(uri, manifest, records)
    return uri


def judge(catalog: list[dict], ms_f: torch.Tensor) -> dict:
    """Rates over the high-MS latents, and (confidence, right) of every judged latent."""
    full = [row for row in catalog if len(row["top_source_ids"]) == TOP and not ms_f[row["latent"]].isnan()]
    high = sorted(full, key=lambda row: -ms_f[row["latent"]])[: len(full) // 4]
    vocabulary = len(load_vocabulary("world"))
    held = {row["latent"]: held_names(row["top_source_ids"]) for row in full}
    right = [row["name"] in held[row["latent"]] for row in high]
    return {
        "high_ms": len(high),
        "right": sum(right) / len(high),
        "unnamed": sum(row["name"] is None for row in high) / len(high),
        "right_of_named": sum(right) / max(1, sum(row["name"] is not None for row in high)),
        "chance": sum(len(held[row["latent"]]) for row in high) / len(high) / vocabulary,
        "full": [row for row in full if row["confidence"] is not None],
        "held": held,
    }


def fit_calibration(sae, ids: list[str], x_nd: torch.Tensor, e_nd: torch.Tensor) -> dict:
    """Logistic regression (Newton's method) of right on the name's top share, for every latent with a
    full top-9, from the label job's own functions run in one process."""
    encoder = TextEncoder(builtin_backbone())
    vocabulary = load_vocabulary("world")
    concepts_vd = concept_embeddings(encoder, vocabulary, LabelConfig.model_fields["prompts"].default)
    with torch.no_grad():
        z_nf = sae.encode(x_nd)
    p_nv = zero_shot_log_probability(
        torch.nn.functional.normalize(e_nd, dim=-1), concepts_vd, encoder.logit_scale, vocabulary.block_v
    ).exp()
    heldout = torch.tensor(
        [in_heldout_fold(i, LabelConfig.model_fields["heldout_fraction"].default) for i in ids]
    )
    rows, latents = (z_nf[~heldout] > 0).nonzero(as_tuple=True)
    sums = PatternSums.of(rows, latents, z_nf[~heldout][rows, latents], p_nv[~heldout], z_nf.shape[1])
    names = specific_names(sums.agreement(), sums.mean_p(), vocabulary)
    top = z_nf.topk(TOP, dim=0)
    judged = [f for f in range(z_nf.shape[1]) if (top.values[:, f] > 0).all() and names.name[f]]
    concept_f = torch.tensor([vocabulary.index(names.name[f]) for f in judged])
    share_f = top_share(p_nv[top.indices[:, judged], concept_f[None]], torch.ones(TOP, len(judged)))
    x = torch.stack([torch.ones(len(judged)), share_f], 1).double()
    y = torch.tensor(
        [float(names.name[f] in held_names([ids[i] for i in top.indices[:, f].tolist()])) for f in judged],
        dtype=torch.float64,
    )
    w = torch.zeros(2, dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(x @ w)
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + 1e-6 * torch.eye(2, dtype=torch.float64)
        w -= torch.linalg.solve(hessian, x.T @ (p - y))
    return dict(zip(("bias", "top_share"), (round(float(v), 2) for v in w), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="fit the calibration on the default seed")
    parser.add_argument("--items", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1)
    connect_ray()
    root = tempfile.mkdtemp(prefix="vlsae-naming-")
    train_ids, train_x, train_e = world_data(args.items, 1, "train")
    sae = demo_recipe_sae(train_x)
    sae.save(f"{root}/sae")
    if args.fit:
        print("CALIBRATION =", fit_calibration(sae, train_ids, train_x, train_e))
    results = {}
    for seed, split in ((1, "train"), (2, "test")):
        ids, x_nd, e_nd = (train_ids, train_x, train_e) if seed == 1 else world_data(args.items, seed, split)
        with torch.no_grad():
            ms_f = monosemanticity_score(sae.encode(x_nd), e_nd)
        data = f"{root}/seed{seed}"
        activations, embeddings = write(f"{data}/block", x_nd, ids), write(f"{data}/embedding", e_nd, ids)
        for method in METHODS:
            config = LabelConfig(
                sae=f"{root}/sae", activations=activations, embeddings=embeddings, naming=method,
                vocabulary="world", top_k=TOP,
                output=f"{data}/labels-{method}",
            )  # fmt: skip
            catalog = read_catalog(run_label(config).catalog).to_pylist()
            results[(seed, method)] = judge(catalog, ms_f)
    print("\n| method | seed/split | high-MS latents | named right | unnamed | right of named | chance |")
    print("|---|---|---|---|---|---|---|")
    for (seed, method), r in results.items():
        where = "1/train (default)" if seed == 1 else "2/test (held out)"
        print(
            f"| {method} | {where} | {r['high_ms']} | {r['right']:.0%} | {r['unnamed']:.0%} | "
            f"{r['right_of_named']:.0%} | {r['chance']:.1%} |"
        )
    for seed in (1, 2):
        r = results[(seed, "activations")]
        named = [row for row in r["full"] if row["name"] is not None]
        right = [row["name"] in r["held"][row["latent"]] for row in named]
        print(f"\nactivations, seed {seed}: {len(named)} named of {len(r['full'])} with a full top-{TOP}")
        print("| confidence | names | mean confidence | right |\n|---|---|---|---|")
        for low, high, count, mean, share in reliability([row["confidence"] for row in named], right):
            print(f"| {low:.1f}-{high:.1f} | {count} | {mean:.2f} | {share:.0%} |")
        sure = [ok for row, ok in zip(named, right, strict=True) if row["confidence"] >= 0.8]
        print(f"confidence >= 0.8: {len(sure)} names, {sum(sure) / max(1, len(sure)):.0%} right")
    print(json.dumps({f"{seed}/{method}": {k: v for k, v in r.items() if k not in ("full", "held")}
                      for (seed, method), r in results.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
