"""Concept-level zero-shot (the VL-SAE paper's Eq. 10) on the concept world: plain CLIP zero-shot
against the enhanced one, per attribute, on held-out items, over seeds.

For each seed s: a VL-SAE with the recipe of jobs/configs/zeroshot/ (its sae and training
sections; the extract config's number of items) is trained by `fit_local`, the train job's step,
on the world CLIP's image and caption embeddings (hook points `visual` and `text`) of training
items of seed s. The evaluate job's world task then classifies `--test-items` held-out items
(split test, seed s) with each attribute's alpha chosen on `--validation-items` other held-out
items (seed 1000 + s). Also written: the accuracy over alpha on the test items (the curve), and a
linear probe of each attribute on the image embeddings (fit on the training items, scored on the
test items): how much of the attribute the embedding holds, a ceiling for any classifier on it.

    .venv/bin/python benchmarks/vlsae_zeroshot.py [--seeds 0 1 2]
      -> benchmarks/results/vlsae_zeroshot.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from vlsae_ray.backbones import Backbone, builtin_backbone
from vlsae_ray.config import ZeroShotConfig
from vlsae_ray.eval.concept_zeroshot import (
    accuracy,
    choose_alpha,
    concept_level_similarity,
    embedding_level_similarity,
)
from vlsae_ray.eval.downstream import image_embeddings, world_task
from vlsae_ray.sae import build_sae
from vlsae_ray.train import fit_local
from vlsae_ray.world import ATTRIBUTES, generate_items

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "jobs" / "configs" / "zeroshot"
RESULTS = ROOT / "benchmarks" / "results"
CURVE_ALPHAS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0]


def embeddings(backbone: Backbone, items) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, caption) embeddings of `items`, read at the hook points the extract job reads."""
    images, texts = [], []
    for i in range(0, len(items), 512):
        batch = items[i : i + 512]
        with torch.no_grad():
            acts = backbone.activations(
                ["visual", "text"],
                pixels=torch.stack([backbone.preprocess(item.image) for item in batch]),
                texts=[item.caption for item in batch],
                item_ids=[item.id for item in batch],
            )
        images.append(acts["visual"].values.float())
        texts.append(acts["text"].values.float())
    return torch.cat(images), torch.cat(texts)


def probe(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression

    unit = torch.nn.functional.normalize
    model = LogisticRegression(max_iter=3000).fit(unit(train_x, dim=-1).numpy(), train_y)
    return float(model.score(unit(test_x, dim=-1).numpy(), test_y))


def run_seed(seed: int, args, recipe: dict, backbone: Backbone) -> dict:
    start = time.perf_counter()
    train_items = generate_items(args.train_items, split="train", seed=seed)
    images, texts = embeddings(backbone, train_items)
    torch.manual_seed(seed)
    sae = build_sae(recipe["sae"])
    training = recipe["training"]
    fit = fit_local(
        sae,
        torch.cat([images, texts]),
        modality=torch.arange(2 * len(images)) >= len(images),
        batch_size=training["batch_size"],
        epochs=training["epochs"],
        seed=seed,
        lr=training["lr"],
    )
    sae.eval()
    config = ZeroShotConfig(
        backbone=builtin_backbone(),
        n_items=args.test_items,
        seed=seed,
        validation_items=args.validation_items,
        validation_seed=1000 + seed,
    )
    task = world_task(config, backbone.model, backbone.tokenizer)
    test_nd = image_embeddings(backbone.model, backbone.preprocess, task.test.images, config.batch_size)
    validation_nd = image_embeddings(
        backbone.model, backbone.preprocess, task.validation.images, config.batch_size
    )
    out = {"fvu": fit["fvu"], "dead_fraction": fit["dead_fraction"], "attributes": {}}
    for name, classes in task.classes.items():
        truth = task.test.truth[name]
        alpha, validation_curve = choose_alpha(
            embedding_level_similarity(validation_nd, classes),
            concept_level_similarity(sae, validation_nd, classes),
            task.validation.truth[name],
            config.alphas,
        )
        embedding = embedding_level_similarity(test_nd, classes)
        concept = concept_level_similarity(sae, test_nd, classes)
        train_labels = [item.labels[name] for item in train_items]
        test_labels = [ATTRIBUTES[name][int(i)] for i in truth]
        out["attributes"][name] = {
            "plain": accuracy(embedding, truth),
            "enhanced": accuracy(embedding + alpha * concept, truth),
            "alpha": alpha,
            "validation_curve": validation_curve,
            "test_curve": {a: accuracy(embedding + a * concept, truth) for a in CURVE_ALPHAS},
            "probe": probe(images, train_labels, test_nd, test_labels),
        }
    out["seconds"] = time.perf_counter() - start
    return out


def markdown(results: dict, args) -> str:
    seeds = list(results)
    attributes = list(results[seeds[0]]["attributes"])
    sae, training = results[seeds[0]]["sae"], results[seeds[0]]["training"]

    def stat(key: str, attribute: str | None = None) -> tuple[float, float]:
        if attribute is None:  # the mean over attributes, per seed
            values = [np.mean([r["attributes"][a][key] for a in attributes]) for r in results.values()]
        else:
            values = [r["attributes"][attribute][key] for r in results.values()]
        return float(np.mean(values)), float(np.std(values))

    def show(mean_std: tuple[float, float], scale: float = 100) -> str:
        return f"{mean_std[0] * scale:.1f} ± {mean_std[1] * scale:.1f}"

    lines = [
        f"# Concept-level zero-shot on the concept world ({len(seeds)} seeds: {', '.join(map(str, seeds))})",
        "",
        f"VL-SAE: {sae['n_latents']} latents, k={sae['k']}, lr {training['lr']:g}, "
        f"batch {training['batch_size']}, {training['epochs']} epochs on the image and caption embeddings "
        f"of {args.train_items} training items; "
        f"{args.test_items} test and {args.validation_items} validation items (held-out pairs) per seed. "
        "Accuracy in %, mean ± std over seeds; alpha per attribute chosen on validation.",
        "",
        "| attribute | plain | enhanced | gain | alphas chosen | linear probe of the image embedding |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for attribute in [*attributes, None]:
        gains = [
            (np.mean([r["attributes"][a]["enhanced"] - r["attributes"][a]["plain"] for a in attributes]))
            if attribute is None
            else r["attributes"][attribute]["enhanced"] - r["attributes"][attribute]["plain"]
            for r in results.values()
        ]
        alphas = (
            ""
            if attribute is None
            else ", ".join(f"{r['attributes'][attribute]['alpha']:g}" for r in results.values())
        )
        plain, enhanced, ceiling = (show(stat(key, attribute)) for key in ("plain", "enhanced", "probe"))
        gain = f"{np.mean(gains) * 100:+.2f} ± {np.std(gains) * 100:.2f}"
        lines.append(f"| {attribute or '**mean**'} | {plain} | {enhanced} | {gain} | {alphas} | {ceiling} |")
    lines += ["", "Test accuracy (%) against alpha, mean over seeds:", ""]
    lines += ["| attribute | " + " | ".join(f"{a:g}" for a in CURVE_ALPHAS) + " |"]
    lines += ["| --- |" + " --- |" * len(CURVE_ALPHAS)]
    for attribute in attributes:
        curve = [
            np.mean([r["attributes"][attribute]["test_curve"][a] for r in results.values()])
            for a in CURVE_ALPHAS
        ]
        lines.append(f"| {attribute} | " + " | ".join(f"{100 * v:.1f}" for v in curve) + " |")
    fvu = np.mean([r["fvu"] for r in results.values()])
    lines += ["", f"VL-SAE training FVU {fvu:.3f} (last batch, mean over seeds).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-items", type=int, default=2000)
    parser.add_argument("--validation-items", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = yaml.safe_load((RECIPE / "train.yaml").read_text())
    args.train_items = yaml.safe_load((RECIPE / "extract.yaml").read_text())["source"]["n_items"]
    backbone = Backbone(builtin_backbone())
    results = {}
    for seed in args.seeds:
        results[seed] = {
            "sae": recipe["sae"],
            "training": recipe["training"],
            **run_seed(seed, args, recipe, backbone),
        }
        print(f"seed {seed}: {results[seed]['seconds']:.0f} s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vlsae_zeroshot.json").write_text(json.dumps(results, indent=1) + "\n")
    report = markdown(results, args)
    (RESULTS / "vlsae_zeroshot.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
