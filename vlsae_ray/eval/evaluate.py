"""The evaluate job: FVU, L0, dead latents and the Monosemanticity Score of a trained SAE.

Streams the activation dataset shard by shard (and the embedding dataset beside it, row for
row), so memory holds one shard and the per-latent statistics, never the whole dataset.
"""

from __future__ import annotations

import json
import math

import torch
from pydantic import BaseModel

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.config import EvaluateConfig
from vlsae_ray.eval.metrics import ReconstructionStats
from vlsae_ray.eval.monosemanticity import MonosemanticityAccumulator
from vlsae_ray.provenance import write_run_info
from vlsae_ray.sae import SparseAutoencoder


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


def _paired_shards(config: EvaluateConfig):
    """(activations, embeddings or None) per shard, checking both datasets cover the same rows."""
    activations = store.read_manifest(config.activations)
    embeddings = store.read_manifest(config.embeddings) if config.embeddings else None
    if embeddings is not None and [s.rows for s in embeddings.shards] != [s.rows for s in activations.shards]:
        raise ValueError(
            f"embeddings {config.embeddings!r} and activations {config.activations!r} have different shards; "
            "extract both from the same job (one run with both hook points)"
        )
    for i, record in enumerate(activations.shards):
        x, ids, _ = store.read_shard(config.activations, record)
        if embeddings is None:
            yield x.float(), None
            continue
        e, embedding_ids, _ = store.read_shard(config.embeddings, embeddings.shards[i])
        if embedding_ids != ids:
            raise ValueError(f"shard {record.index} of the embeddings holds other items than the activations")
        yield x.float(), e.float()


def _median(scores: torch.Tensor) -> float | None:
    finite = scores[~scores.isnan()]
    return float(finite.median()) if finite.numel() else None


@torch.no_grad()
def run_evaluate(config: EvaluateConfig) -> EvaluateSummary:
    storage.check_writable(config.output)
    sae = SparseAutoencoder.load(config.sae).eval()
    manifest = store.read_manifest(config.activations)
    if manifest.d != sae.config.d_in:
        raise ValueError(
            f"SAE {config.sae!r} takes d_in={sae.config.d_in} but {config.activations!r} has d={manifest.d}"
        )
    stats = ReconstructionStats(manifest.d, sae.config.n_latents)
    ms_latents = ms_neurons = None
    for x_nd, e_nd in _paired_shards(config):
        for start in range(0, x_nd.shape[0], config.batch_size):
            x_bd = x_nd[start : start + config.batch_size]
            x_hat_bd, z_bf, _ = sae(x_bd)
            stats.update(x_bd, x_hat_bd, z_bf)
            if e_nd is not None:
                if ms_latents is None:
                    ms_latents = MonosemanticityAccumulator(sae.config.n_latents, e_nd.shape[1])
                    ms_neurons = MonosemanticityAccumulator(manifest.d, e_nd.shape[1])
                ms_latents.observe(z_bf)
                ms_neurons.observe(x_bd)
    if ms_latents is not None:  # the second pass of the MS: min and max are known now
        for x_nd, e_nd in _paired_shards(config):
            for start in range(0, x_nd.shape[0], config.batch_size):
                x_bd, e_bd = x_nd[start : start + config.batch_size], e_nd[start : start + config.batch_size]
                ms_latents.accumulate(sae.encode(x_bd), e_bd)
                ms_neurons.accumulate(x_bd, e_bd)
    summary = EvaluateSummary(
        report=storage.join(config.output, "report.md"),
        rows=stats.rows,
        n_latents=sae.config.n_latents,
        fvu=stats.fvu(),
        l0=stats.l0(),
        dead_fraction=stats.dead_fraction(),
    )
    if ms_latents is not None:
        latent_scores, neuron_scores = ms_latents.score(), ms_neurons.score()
        summary.ms_latents_median = _median(latent_scores)
        summary.ms_neurons_median = _median(neuron_scores)
        summary.scores = storage.join(config.output, "monosemanticity.json")
        storage.write_text(
            summary.scores,
            json.dumps({"latents": _nan_to_none(latent_scores), "neurons": _nan_to_none(neuron_scores)}),
        )
    storage.write_text(summary.report, _markdown(config, summary))
    write_run_info(config.output, "evaluate", config, **summary.model_dump())
    return summary


def _nan_to_none(scores: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(value) else value for value in scores.tolist()]


def _markdown(config: EvaluateConfig, summary: EvaluateSummary) -> str:
    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return "\n".join(
        [
            f"# SAE evaluation: {config.sae}",
            "",
            f"Activations: `{config.activations}` ({summary.rows} rows); embeddings: `{config.embeddings}`.",
            "",
            "| metric | value |",
            "| --- | --- |",
            f"| FVU | {summary.fvu:.4f} |",
            f"| L0 | {summary.l0:.2f} |",
            f"| dead latents | {summary.dead_fraction:.1%} of {summary.n_latents} |",
            f"| median MS, SAE latents | {show(summary.ms_latents_median)} |",
            f"| median MS, raw neurons | {show(summary.ms_neurons_median)} |",
            "",
        ]
    )
