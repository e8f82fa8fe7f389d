"""The steer job: every concept latent of a catalog clamped inside the backbone, measured on the
concept world's ground truth (`vlsae_ray.steer.measure`), as a Ray job.

(latent, image) pairs form a Ray Data dataset; an actor pool holds the backbone and the SAE
(`concurrency` actors, `gpus_per_actor` GPUs each when the cluster has GPUs) and runs every pair
unsteered and at each mode and strength, a batch of pairs with different latents in one forward
(per-row edits). The driver writes to `output`: `steering.json` (curves, best strengths, goal
rows, per-latent steerability and, for LLaVA, the steering score), `pairs.parquet` (every pair's
predictions at every setting, for your own analysis), `report.md` with
`flip_vs_strength.png` and `examples.png`, and `run.json`; and it writes each measured latent's
steerability into the catalog (`steerability` column, null for latents not measured).
"""

from __future__ import annotations

import io
import json
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel

from vlsae_ray import progress, storage
from vlsae_ray.backbones import load_backbone
from vlsae_ray.backbones.backbone import LIBRARIES
from vlsae_ray.config import SteerConfig
from vlsae_ray.devices import assigned_device, gpu_request
from vlsae_ray.interpret.catalog import SCHEMA, catalog_rows, read_catalog, write_catalog
from vlsae_ray.local_stack import connect_ray
from vlsae_ray.provenance import write_run_info
from vlsae_ray.sae import SparseAutoencoder
from vlsae_ray.sae.base import load_config
from vlsae_ray.steer import plots
from vlsae_ray.steer.measure import (
    GOAL_FLIP,
    GOAL_HOLD,
    Steerer,
    concept_latents,
    run_pairs,
    spread,
    steering_pairs,
    steering_score,
    summarize,
)

log = logging.getLogger(__name__)

STEERING_FILE, REPORT_FILE, PAIRS_FILE = "steering.json", "report.md", "pairs.parquet"
COLUMNS = (
    "latent",
    "attribute",
    "value",
    "max_activation",
    "name",
    "item",
    "kind",
    "mode",
    "strength",
    "predicted",
)


class SteerSummary(BaseModel):
    steering: str
    report: str
    concept_latents: int
    pairs: int
    goals: dict[str, bool]  # "attribute/mode" -> flip >= 0.8 at hold >= 0.9, for colour and shape


class _SteerActor:
    """One model replica: a batch of (latent, image) pairs in, one row per pair and setting out."""

    def __init__(self, config: SteerConfig, families: dict[str, list[int]] | None):
        device = assigned_device()
        backbone = load_backbone(config.backbone, device)
        sae = SparseAutoencoder.load(config.sae, device).eval()
        self.steerer = Steerer(backbone, sae, config.hook_point, config.tokens)
        self.config, self.families = config, families

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = run_pairs(
            self.steerer, _rows(batch, list(batch)), self.config.modes, self.config.strengths, self.families
        )
        return {key: np.array([row[key] for row in rows], dtype=object) for key in COLUMNS}


def _rows(batch: dict[str, np.ndarray], keys) -> list[dict]:
    """A numpy batch as one dict of plain Python values per row."""
    plain = {key: [v.item() if isinstance(v, np.generic) else v for v in batch[key]] for key in keys}
    return [dict(zip(keys, values, strict=True)) for values in zip(*plain.values(), strict=True)]


def _check(config: SteerConfig) -> None:
    """Bad settings fail before any work: the hook point exists, the backbone is one the job can
    measure, and the SAE's config is readable (a width mismatch fails in the hook, naming both)."""
    model = LIBRARIES[config.backbone.library].meta_model(config.backbone)
    try:
        model.get_submodule(config.hook_point)
    except AttributeError:
        raise ValueError(
            f"hook_point {config.hook_point!r} is not a module of {type(model).__name__}; for LLaVA name it "
            "from the whole model, e.g. model.vision_tower.encoder.layers.2"
        ) from None
    if config.backbone.library not in ("open_clip", "llava"):
        raise ValueError(
            f"backbone.library {config.backbone.library!r}: the steer job measures an open_clip CLIP "
            "(zero-shot) or a LLaVA (answers)"
        )
    load_config(config.sae)  # a missing or unreadable SAE fails here


def run_steer(config: SteerConfig) -> SteerSummary:
    import ray

    storage.check_writable(config.output)
    _check(config)
    catalog = read_catalog(config.catalog)
    found = concept_latents(catalog, config.min_images)
    if not found:
        raise ValueError(
            f"no concept latents in {config.catalog!r}: no latent's top images (at least {config.min_images} "
            "distinct concept-world items) all share one attribute value"
        )
    latents = spread(found, config.max_latents)
    llava = config.backbone.library == "llava"
    pairs = steering_pairs(latents, config.n_images, config.split, config.seed, probes=llava)
    families = None
    if config.swap:
        families = {}
        for latent in found:
            families.setdefault(latent.attribute, []).append(latent.latent)
    log.info("steer: %d concept latents (%d measured), %d pairs", len(found), len(latents), len(pairs))

    connect_ray()
    gpus = gpu_request(
        config.backbone.device, config.gpus_per_actor, "steering's model actors", "gpus_per_actor"
    )
    blocks = math.ceil(len(pairs) / config.batch_size)
    ds = ray.data.from_items(pairs, override_num_blocks=blocks)
    ds = ds.map_batches(
        _SteerActor,
        fn_constructor_args=(config, families),
        batch_size=config.batch_size,
        concurrency=config.concurrency,
        num_gpus=gpus,
        batch_format="numpy",
    )
    rows = []
    with progress.stage("steer", len(pairs), "pairs"):
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows += _rows(batch, COLUMNS)
            progress.advance(int((batch["mode"] == "none").sum()))  # one unsteered row per pair
    summary = summarize(rows)
    if llava:
        summary["steering_score"] = _score(summary.pop("probes"), catalog, latents)
    summary |= {"config": config.model_dump(mode="json"), "goal": {"flip": GOAL_FLIP, "hold": GOAL_HOLD}}

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(storage.join(config.output, PAIRS_FILE), buffer.getvalue())
    steering_uri = storage.join(config.output, STEERING_FILE)
    storage.write_text(steering_uri, json.dumps(summary, indent=1))
    storage.write_bytes(storage.join(config.output, "flip_vs_strength.png"), plots.flip_vs_strength(summary))
    storage.write_bytes(storage.join(config.output, "examples.png"), plots.examples(rows, latents, summary))
    report_uri = storage.join(config.output, REPORT_FILE)
    storage.write_text(report_uri, _markdown(config, summary, len(found)))
    _write_steerability(config.catalog, catalog, summary["steerability"])
    goals = {
        key: point["goal_met"]
        for key, point in summary["best"].items()
        if key.split("/")[0] in ("colour", "shape")
    }
    result = SteerSummary(
        steering=steering_uri, report=report_uri, concept_latents=len(found), pairs=len(pairs), goals=goals
    )
    write_run_info(config.output, "steer", config, **result.model_dump())
    return result


def _score(probes: dict, catalog: pa.Table, latents) -> dict:
    """The steering score with the built-in world CLIP as the embedding model (it knows the world's words)."""
    from vlsae_ray.world import load_world_clip

    clip, preprocess, tokenizer = load_world_clip()
    wanted = {latent.latent for latent in latents}
    top_images = {
        row["latent"]: list(dict.fromkeys(row["top_source_ids"]))
        for row in catalog.select(["latent", "top_source_ids"]).to_pylist()
        if row["latent"] in wanted
    }
    with torch.no_grad():
        return steering_score(probes, top_images, clip.eval(), preprocess, tokenizer)


def _write_steerability(uri: str, catalog: pa.Table, steerability: dict[int, float]) -> None:
    """The catalog with `steerability` set for the measured latents (others null), replaced whole;
    columns an older catalog lacks are written as nulls."""
    present = set(catalog.column_names)
    columns = {
        name: catalog.column(name).to_pylist() if name in present else [None] * catalog.num_rows
        for name in SCHEMA.names
    }
    columns["steerability"] = [steerability.get(latent) for latent in columns["latent"]]
    metadata = catalog.schema.metadata or {}
    config = json.loads(metadata.get(b"vlsae_label_config", b"{}"))
    write_catalog(uri, columns, config, catalog_rows(catalog))


def _markdown(config: SteerConfig, summary: dict, n_found: int) -> str:
    lines = [
        "# Steering report",
        "",
        f"SAE `{config.sae}` at `{config.hook_point}` of `{config.backbone.model}`, tokens {config.tokens}, "
        f"{len(summary['steerability'])} of {n_found} concept latents, {config.n_images} held-out images each"
        + (", other latents of the attribute ablated (swap)" if config.swap else ""),
        "",
        "Unsteered accuracy on these images: "
        + ", ".join(f"{a} {acc:.2f}" for a, acc in summary["unsteered_accuracy"].items())
        + f". Hold is measured on the attributes known at >= 0.9: {', '.join(summary['known_attributes'])}.",
        "",
        "## Best strength per attribute and mode",
        "",
        "| attribute | mode | strength (x max) | flip | hold (known) | hold (all) | chance | latents "
        "| goal |",
        "| --- " * 9 + "|",
    ]
    for key, p in sorted(summary["best"].items()):
        attribute, mode = key.split("/")
        lines.append(
            f"| {attribute} | {mode} | {p['strength']:g} | {p['flip'][0]:.2f} ± {p['flip'][1]:.2f} | "
            f"{p['hold_known'][0]:.2f} ± {p['hold_known'][1]:.2f} | {p['hold'][0]:.2f} | {p['chance']:.2f} | "
            f"{p['latents']} | {'met' if p['goal_met'] else 'not met'} |"
        )
    lines += ["", "![flip rate against strength](flip_vs_strength.png)", "", "![examples](examples.png)", ""]
    if "steering_score" in summary:
        lines += ["## Steering score (Pach et al.)", "", "| setting | protocol | score | shuffled latents |"]
        lines += ["| --- | --- | --- | --- |"]
        for key, s in summary["steering_score"].items():
            setting, protocol = key.rsplit("/", 1)
            lines.append(
                f"| {setting} | {protocol} | {s['score'][0]:.3f} ± {s['score'][1]:.3f} | "
                f"{s['shuffled'][0]:.3f} ± {s['shuffled'][1]:.3f} |"
            )
    return "\n".join(lines) + "\n"
