"""`vlsae demo`: every stage once, on the embedded default, on this machine.

extract (Ray Data) -> train (Ray Train, 2 workers) -> evaluate -> label -> serve (Ray Serve,
one real HTTP request). Each stage's config is written next to the artifacts, so any stage can be
rerun alone with `vlsae STAGE -c ROOT/configs/STAGE.yaml`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import yaml

from vlsae_ray import progress, storage
from vlsae_ray.backbones import builtin_backbone, hook_dims
from vlsae_ray.config import (
    BackboneConfig,
    EvaluateConfig,
    ExtractConfig,
    LabelConfig,
    ServeConfig,
    TrainConfig,
    parse_config,
)
from vlsae_ray.eval.evaluate import SCORES_FILE
from vlsae_ray.interpret.catalog import CATALOG_FILE, read_catalog
from vlsae_ray.interpret.ground_truth import held_names

DEMO_BUCKET = "vlsae-demo"
BLOCK = "visual.transformer.resblocks.2"
EMBEDDING = "visual"


def demo_configs(root: str, backbone: BackboneConfig, n_items: int, port: int) -> dict:
    """The five stage configs of the demo, all artifacts under `root`."""
    activations, embeddings = (
        storage.join(root, "activations", BLOCK),
        storage.join(root, "activations", EMBEDDING),
    )
    sae = storage.join(root, "sae")
    d = hook_dims(backbone, [BLOCK])[BLOCK]
    raw = {
        "extract": {
            "source": {"n_items": n_items, "seed": 0},
            "backbone": backbone.model_dump(),
            "hook_points": [BLOCK, EMBEDDING],
            "output": storage.join(root, "activations"),
            "shard_rows": 512,
        },
        "train": {
            "activations": activations,
            # k = 40 and lr 8e-4 (not the short-run default, 0.02 here) leave few latents dead at a
            # better FVU than k = 16 at the default rate, which left 85% dead (benchmarks/naming.py)
            "sae": {"architecture": "topk", "d_in": d, "n_latents": 8 * d, "k": 40},
            "training": {
                "batch_size": 256,
                "epochs": 8,
                "lr": 8e-4,
                "num_workers": 2,
                "cpus_per_worker": 0.5,
            },
            "output": sae,
        },
        "evaluate": {
            "sae": sae,
            "activations": activations,
            "embeddings": embeddings,
            # downstream: the CLIP's zero-shot accuracy on held-out items with the SAE spliced in
            "zero_shot": {"backbone": backbone.model_dump(), "n_items": 500},
            "output": storage.join(root, "report"),
        },
        "label": {
            "sae": sae,
            "activations": activations,
            "embeddings": embeddings,
            # the world's own concepts: every name can be checked against the items' ground truth
            "vocabulary": "world",
            "top_k": 9,
            "output": storage.join(root, "labels"),
        },
        "serve": {
            "backbone": backbone.model_dump(),
            "saes": {
                "demo": {
                    "sae": sae,
                    "hook_point": BLOCK,
                    "catalog": storage.join(root, "labels", CATALOG_FILE),
                    "monosemanticity": storage.join(root, "report", SCORES_FILE),
                }
            },
            "top_k": 8,
            "port": port,
        },
    }
    models = {
        "extract": ExtractConfig,
        "train": TrainConfig,
        "evaluate": EvaluateConfig,
        "label": LabelConfig,
        "serve": ServeConfig,
    }
    return {name: parse_config(raw[name], models[name], source=f"demo {name} config") for name in raw}


def _serve_check(config: ServeConfig) -> dict:
    """Start the HTTP API, send one real image and one non-image, stop it."""
    import base64

    import requests
    from ray import serve

    from serve.app import build_app
    from serve.load import png
    from vlsae_ray.activations.sources import load_image, package_photo_items

    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(build_app(config), name="vlsae", route_prefix="/")
        progress.advance()
        url = f"http://{config.host}:{config.port}/v1/encode"
        item = package_photo_items(1)[0]
        good = requests.post(url, json={"sae": "demo", "images": [png(load_image(item["id"]))]}, timeout=60)
        progress.advance()
        not_image = base64.b64encode(b"not an image").decode()
        bad = requests.post(url, json={"sae": "demo", "images": [not_image]}, timeout=60)
        progress.advance()
        return {
            "url": url,
            "item": item["id"],
            "status": good.status_code,
            "response": good.json(),
            "bad_status": bad.status_code,
        }
    finally:
        serve.shutdown()


def run_demo(root: str | None = None, use_s3: bool = False, n_items: int = 2048) -> dict:
    from vlsae_ray.activations.extract import run_extract
    from vlsae_ray.eval.evaluate import run_evaluate
    from vlsae_ray.interpret.label import run_label
    from vlsae_ray.local_stack import SeaweedFS, connect_ray, free_port
    from vlsae_ray.train.ray_train import run_train

    started = time.perf_counter()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # keep the demo's output readable
    with contextlib.ExitStack() as stack:
        if use_s3:
            # the server's data stays on disk: `vlsae local-s3 --dir vlsae-demo/s3` serves it again
            server = stack.enter_context(SeaweedFS(os.path.abspath("vlsae-demo/s3"), buckets=(DEMO_BUCKET,)))
            progress.echo(f"SeaweedFS S3 server on {server.endpoint}, data in vlsae-demo/s3")
            root = root or f"s3://{DEMO_BUCKET}/demo"
        root = root or os.path.abspath("vlsae-demo")
        connect_ray()
        stack.callback(_shutdown_ray)
        # with --s3 the model is read from the object store too, as on a cluster
        backbone = builtin_backbone(storage.join(root, "backbone", "world-clip.pt") if use_s3 else None)
        configs = demo_configs(root, backbone, n_items, free_port())
        for name, config in configs.items():
            storage.write_text(
                storage.join(root, "configs", f"{name}.yaml"), yaml.safe_dump(config.model_dump(mode="json"))
            )
        timings, results = {}, {}
        for name, job in (
            ("extract", run_extract),
            ("train", run_train),
            ("evaluate", run_evaluate),
            ("label", run_label),
            ("serve", _serve_check),
        ):
            t0 = time.perf_counter()
            if name == "serve":
                with progress.stage("serve", 3, "steps"):  # start, an image, a non-image
                    results[name] = job(configs[name])
            else:
                results[name] = job(configs[name])
            timings[name] = time.perf_counter() - t0
            text, _ = _result(name, results[name])
            progress.echo(f"{name:<9} {timings[name]:>4.0f}s  {text}")
        # read while the object store still runs (with --s3 it stops when the stack closes)
        concepts = _concept_rows(results["evaluate"], results["label"], configs["label"].top_k)
    progress.echo(f"\nvlsae demo finished in {time.perf_counter() - started:.0f} s; artifacts:")
    for name, result in results.items():
        progress.echo(f"  {name:<9} {_result(name, result)[1]}")
    progress.echo("\nThe most monosemantic latents: the world concepts their top images share, their name")
    progress.echo("\n".join(f"  {row}" for row in concepts))
    return results


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


def _concept_rows(evaluate, label, top_k: int, n: int = 6) -> list[str]:
    """The n most monosemantic latents with a full top-image set: the world concepts all but at most
    one of those images hold, and the latent's name in the catalog (or that it has none), whether it is
    one of them, its confidence and its held-out AUROC."""
    scores = json.loads(storage.read_text(evaluate.scores))["latents"]
    catalog = read_catalog(label.catalog).to_pylist()
    full = [
        row for row in catalog if scores[row["latent"]] is not None and len(row["top_source_ids"]) == top_k
    ]
    rows = []
    for row in sorted(full, key=lambda row: -scores[row["latent"]])[:n]:
        held = held_names(row["top_source_ids"])
        shared = ", ".join(sorted(held)) or "no one concept"
        if row["name"] is None:
            name = "unnamed"
        else:
            name = f"named {row['name']!r} {'(right)' if row['name'] in held else '(wrong)'}"
        confidence = "" if row["confidence"] is None else f"confidence {row['confidence']:.2f}"
        auroc = "" if row["heldout_auroc"] is None else f", held-out AUROC {row['heldout_auroc']:.2f}"
        rows.append(
            f"latent {row['latent']:>4}  MS {scores[row['latent']]:.3f}  top {top_k} share: {shared}\n"
            f"{'':>18}{name}, {confidence}{auroc}"
        )
    return rows


def _zero_shot(evaluate) -> str:
    if evaluate.zero_shot is None:
        return "zero-shot skipped"
    accuracy = {run: sum(acc.values()) / len(acc) for run, acc in evaluate.zero_shot.items()}
    return f"zero-shot {accuracy['without']:.3f} -> {accuracy['with_sae']:.3f} with the SAE"


def _result(stage: str, result) -> tuple[str, str]:
    """(a stage's one-line result, where its artifacts are)."""
    if stage == "extract":
        rows = " + ".join(str(n) for n in result.rows.values())
        text = f"{result.items} items -> {rows} rows, {sum(result.skipped_items.values())} skipped"
        return text, ", ".join(result.datasets.values())
    if stage == "train":
        rate, fvu = result.samples_per_second, result.metrics["fvu"]
        text = f"{result.steps} steps, {rate:.0f} samples/s, fvu {fvu:.3f}"
        return text, result.output
    if stage == "evaluate":
        text = (
            f"FVU {result.fvu:.3f}, L0 {result.l0:.1f}, dead {result.dead_fraction:.1%}, median MS "
            f"{result.ms_latents_median:.3f} (neurons {result.ms_neurons_median:.3f}), {_zero_shot(result)}"
        )
        return text, result.report
    if stage == "label":
        text = (
            f"{result.latents_with_examples}/{result.n_latents} latents fire, {result.latents_named} named, "
            f"{result.latents_unnamed} unnamed ({result.naming})"
        )
        return text, result.catalog
    latents = result["response"]["results"][0]["latents"][:3]
    top = ", ".join(f"{x['latent']} {x['name'] or 'unnamed'} {x['activation']:.2f}" for x in latents)
    text = f"POST /v1/encode -> {result['status']} (top {top}); non-image -> {result['bad_status']}"
    return text, result["url"]
