"""The evaluate job: how good and how interpretable a trained SAE is, written up as a report.

Two Ray Data map-reduce passes over the activation dataset (and the embedding dataset beside it,
row for row; `dataset_pass`, whose tasks request `gpus_per_task` GPUs when the Ray cluster has
GPUs and `device` allows) give FVU, L0 and dead latents of every checkpoint, the
Monosemanticity Score of the SAE's latents and of the layer's raw neurons, and each latent's top
images. From those: uniqueness (`uniqueness`), for a VL-SAE the intra- and inter-concept
image/text similarity (`concept_similarity`, with a third pass over the text-side dataset), and,
when configured, zero-shot accuracy with the SAE spliced into the backbone (`downstream`). The
report (report.md, its PNG plots, monosemanticity.json, run.json) goes to `output` via `storage`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch
from pydantic import BaseModel

from vlsae_ray import progress, storage
from vlsae_ray.activations import store
from vlsae_ray.config import EvaluateConfig
from vlsae_ray.devices import gpu_request
from vlsae_ray.eval import plots
from vlsae_ray.eval.concept_similarity import concept_similarity
from vlsae_ray.eval.dataset_pass import FirstPass, PassPlan, first_pass, ms_pass
from vlsae_ray.eval.downstream import IMAGE_EMBEDDING, enhances, splice_token, zero_shot_with_sae
from vlsae_ray.eval.metrics import nan_to_none
from vlsae_ray.eval.uniqueness import top_set_overlap
from vlsae_ray.provenance import write_run_info
from vlsae_ray.sae import MatryoshkaConfig, VLSAEConfig
from vlsae_ray.sae.base import load_sae

SCORES_FILE = "monosemanticity.json"


class CheckpointResult(BaseModel):
    sae: str
    fvu: float
    l0: float
    dead_fraction: float


class EvaluateSummary(BaseModel):
    report: str
    rows: int
    n_latents: int
    fvu: float
    l0: float
    dead_fraction: float
    scores: str | None = None  # URI of the per-latent and per-neuron MS (monosemanticity.json)
    ms_latents_median: float | None = None
    ms_neurons_median: float | None = None
    uniqueness: float | None = None
    mean_max_jaccard: float | None = None
    duplicate_fraction: float | None = None
    checkpoints: list[CheckpointResult] = []
    prefix_fvu: list[float] | None = None  # Matryoshka: FVU of each nested prefix
    # {"without" | "with_sae" | "enhanced": {task: accuracy}, "alpha": {task: alpha}}; the last two
    # for a VL-SAE on the image embedding (concept-level zero-shot)
    zero_shot: dict[str, dict[str, float]] | None = None
    concept_similarity: dict[str, float] | None = None  # VL-SAE
    notes: list[str] = []  # what was skipped, and why
    plots: dict[str, str] = {}  # name -> URI of the PNG


def _median(scores: torch.Tensor) -> float | None:
    finite = scores[~scores.isnan()]
    return float(finite.median()) if finite.numel() else None


def _check_checkpoints(config: EvaluateConfig, d: int) -> None:
    for uri in [config.sae, *config.checkpoints]:
        sae = load_sae(uri)
        if sae.config.d_in != d:
            raise ValueError(
                f"SAE {uri!r} takes d_in={sae.config.d_in} but {config.activations!r} has d={d}: "
                "evaluate an SAE on the activations of the layer it was trained on"
            )


@torch.no_grad()
def run_evaluate(config: EvaluateConfig) -> EvaluateSummary:
    storage.check_writable(config.output)
    manifest = store.read_manifest(config.activations)
    _check_checkpoints(config, manifest.d)
    sae = load_sae(config.sae)
    is_vlsae = isinstance(sae.config, VLSAEConfig)
    gpus = gpu_request(config.device, config.gpus_per_task, "evaluate's SAE tasks", "gpus_per_task")
    plan = PassPlan(
        activations=config.activations,
        embeddings=config.embeddings,
        sae=config.sae,
        checkpoints=tuple(config.checkpoints),
        top_k=config.top_k,
        keep_vectors=is_vlsae and config.text_activations is not None,
        batch_size=config.batch_size,
        shards_per_task=config.shards_per_task,
        cpus_per_task=config.cpus_per_task,
        gpus_per_task=gpus,
    )
    with progress.stage("evaluate", _tasks(config, plan), "tasks"):
        return _evaluate(config, plan, sae, manifest)


def _tasks(config: EvaluateConfig, plan: PassPlan) -> int:
    """Evaluate's steps: the shard tasks of each pass, then the zero-shot check."""
    tasks = -(-len(store.read_manifest(config.activations).shards) // plan.shards_per_task)
    vl_text = 0
    if config.text_activations and plan.keep_vectors:  # a VL-SAE's text pass
        vl_text = -(-len(store.read_manifest(config.text_activations).shards) // plan.shards_per_task)
    return tasks * (1 + bool(config.embeddings)) + vl_text + (config.zero_shot is not None)


def _evaluate(config: EvaluateConfig, plan: PassPlan, sae, manifest) -> EvaluateSummary:
    is_vlsae = isinstance(sae.config, VLSAEConfig)
    first = first_pass(plan)
    stats = first.stats[config.sae]
    summary = EvaluateSummary(
        report=storage.join(config.output, "report.md"),
        rows=first.rows,
        n_latents=sae.config.n_latents,
        fvu=stats.fvu(),
        l0=stats.l0(),
        dead_fraction=stats.dead_fraction(),
        checkpoints=[
            CheckpointResult(sae=uri, fvu=s.fvu(), l0=s.l0(), dead_fraction=s.dead_fraction())
            for uri, s in first.stats.items()
        ],
    )
    overlap = top_set_overlap(first.top.sets())
    if overlap["latents"]:
        summary.uniqueness = overlap["uniqueness"]
        summary.mean_max_jaccard = overlap["mean_max_jaccard"]
        summary.duplicate_fraction = overlap["duplicate_fraction"]
    if isinstance(sae.config, MatryoshkaConfig):
        summary.prefix_fvu = stats.prefix_fvu()

    ms_latents = None
    if config.embeddings:
        ms_neurons, ms_latents = ms_pass(plan, first)
        summary.ms_latents_median, summary.ms_neurons_median = _median(ms_latents), _median(ms_neurons)
        summary.scores = storage.join(config.output, SCORES_FILE)
        scores = {"latents": nan_to_none(ms_latents), "neurons": nan_to_none(ms_neurons)}
        storage.write_text(summary.scores, json.dumps(scores))
        _write_plot(
            summary, config, "ms_histogram", plots.ms_histogram(ms_latents.numpy(), ms_neurons.numpy())
        )
    else:
        summary.notes.append("MS skipped: no `embeddings` dataset configured")

    if is_vlsae and config.text_activations:
        summary.concept_similarity = _vlsae_similarity(config, plan, first)
    elif is_vlsae:
        summary.notes.append("VL-SAE concept similarity skipped: no `text_activations` configured")

    if config.zero_shot is not None:
        hook_point = config.zero_shot.hook_point or manifest.hook_point
        token = splice_token(manifest.token)
        summary.zero_shot = zero_shot_with_sae(config.zero_shot, hook_point, sae, token)
        if not enhances(sae, hook_point):
            summary.notes.append(
                f"concept-level zero-shot not run: it needs a VL-SAE on the image embedding (hook point "
                f"`{IMAGE_EMBEDDING}`), not a {sae.config.architecture} SAE at `{hook_point}`"
            )
        progress.advance()
    else:
        summary.notes.append("zero-shot skipped: no `zero_shot` task configured")

    points = [(c.sae.rstrip("/").rsplit("/", 1)[-1], c.l0, c.fvu) for c in summary.checkpoints]
    _write_plot(summary, config, "fvu_vs_l0", plots.fvu_vs_l0(points))
    if summary.prefix_fvu is not None:
        ends = sae.config.group_ends
        _write_plot(summary, config, "matryoshka_groups", plots.matryoshka_groups(ends, summary.prefix_fvu))
    if ms_latents is not None and config.grid_latents:
        _top_image_grid(summary, config, first, ms_latents)

    storage.write_text(summary.report, _markdown(config, summary))
    write_run_info(config.output, "evaluate", config, **summary.model_dump())
    return summary


def _write_plot(summary: EvaluateSummary, config: EvaluateConfig, name: str, png: bytes) -> None:
    uri = storage.join(config.output, f"{name}.png")
    storage.write_bytes(uri, png)
    summary.plots[name] = uri


def _vlsae_similarity(config: EvaluateConfig, plan: PassPlan, first: FirstPass) -> dict[str, float]:
    """A pass over the text-side dataset for each concept's top captions, then the similarities."""
    text_plan = dataclasses.replace(
        plan, activations=config.text_activations, embeddings=None, checkpoints=()
    )
    text = first_pass(text_plan)

    def vectors(top) -> list[torch.Tensor]:
        return [
            torch.stack([top.vectors[row] for row in rows]) if rows else torch.zeros(0, 1)
            for rows in top.sets()
        ]

    return concept_similarity(vectors(first.top), vectors(text.top))


def _top_image_grid(summary: EvaluateSummary, config: EvaluateConfig, first: FirstPass, ms_f) -> None:
    from vlsae_ray.activations.sources import load_image

    sets = first.top.sets()
    ranked = sorted(
        (j for j in range(len(sets)) if len(sets[j]) >= 2 and not math.isnan(ms_f[j])), key=lambda j: -ms_f[j]
    )[: config.grid_latents]
    if not ranked:
        summary.notes.append("top-image grid skipped: no latent with an MS fires on two images or more")
        return
    try:
        rows = [
            (
                f"latent {j}\nMS {float(ms_f[j]):.2f}",
                [load_image(first.top.source_ids[row]) for row in sets[j]],
            )
            for j in ranked
        ]
    except (KeyError, ValueError) as error:
        summary.notes.append(
            f"top-image grid skipped: the source's images cannot be rebuilt from ids ({error})"
        )
        return
    _write_plot(summary, config, "top_images", plots.top_image_grid(rows, config.top_k))


def _show(value: float | None, digits: int = 4) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def _markdown(config: EvaluateConfig, summary: EvaluateSummary) -> str:
    lines = [
        f"# SAE evaluation: {config.sae}",
        "",
        f"Activations: `{config.activations}` ({summary.rows} rows); embeddings: `{config.embeddings}`.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| FVU | {summary.fvu:.4f} |",
        f"| L0 | {summary.l0:.2f} |",
        f"| dead latents | {summary.dead_fraction:.1%} of {summary.n_latents} |",
        f"| median MS, SAE latents | {_show(summary.ms_latents_median)} |",
        f"| median MS, raw neurons | {_show(summary.ms_neurons_median)} |",
        f"| uniqueness (1 - mean max Jaccard of top-{config.top_k} sets) | {_show(summary.uniqueness)} |",
        f"| latents whose top set duplicates another's | {_show(summary.duplicate_fraction)} |",
        "",
    ]
    if "ms_histogram" in summary.plots:
        lines += ["## Monosemanticity Score", "", "![MS histogram](ms_histogram.png)", ""]
    lines += ["## Checkpoints", "", "| SAE | FVU | L0 | dead |", "| --- | --- | --- | --- |"]
    lines += [
        f"| `{c.sae}` | {c.fvu:.4f} | {c.l0:.2f} | {c.dead_fraction:.1%} |" for c in summary.checkpoints
    ]
    lines += ["", "![FVU vs L0](fvu_vs_l0.png)", ""]
    if summary.prefix_fvu is not None:
        lines += ["## Matryoshka groups", "", "FVU of each nested prefix: "]
        lines += [
            ", ".join(f"{value:.4f}" for value in summary.prefix_fvu),
            "",
            "![groups](matryoshka_groups.png)",
            "",
        ]
    if summary.zero_shot is not None:
        zero_shot = summary.zero_shot
        enhanced = "enhanced" in zero_shot
        lines += [
            "## Zero-shot with the SAE spliced in",
            "",
            "| task | without | with SAE |" + (" concept-level (alpha) |" if enhanced else ""),
            "| --- | --- | --- |" + (" --- |" if enhanced else ""),
        ]
        for task, accuracy in zero_shot["without"].items():
            row = f"| {task} | {accuracy:.3f} | {zero_shot['with_sae'][task]:.3f} |"
            if enhanced:
                row += f" {zero_shot['enhanced'][task]:.3f} ({zero_shot['alpha'][task]:g}) |"
            lines.append(row)
        if enhanced:
            lines += [
                "",
                "Concept-level: cos(v, t_c) + alpha cos(z_v, z_c) of the VL-SAE latents z, with each task's "
                "alpha chosen on validation images (`vlsae_ray.eval.concept_zeroshot`).",
            ]
        lines.append("")
    if summary.concept_similarity is not None:
        lines += [
            "## VL-SAE concepts: intra- and inter-concept similarity",
            "",
            "| quantity | value |",
            "| --- | --- |",
        ]
        lines += [f"| {key} | {_show(float(value))} |" for key, value in summary.concept_similarity.items()]
        lines.append("")
    if "top_images" in summary.plots:
        lines += ["## Top images of the highest-MS latents", "", "![top images](top_images.png)", ""]
    if summary.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in summary.notes], ""]
    return "\n".join(lines)
