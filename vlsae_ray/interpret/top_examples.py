"""The label job: each latent's top-activating examples, exact, in one streaming pass.

For every latent we keep the k largest activations seen so far and the rows they came from;
merging a batch is a top-k over (kept, batch), so the result is the exact top-k over the whole
dataset whatever the batch order (ties broken towards the earlier row).
"""

from __future__ import annotations

import json

import torch
from pydantic import BaseModel

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.config import LabelConfig
from vlsae_ray.provenance import write_run_info
from vlsae_ray.sae import SparseAutoencoder

LABELS_FILE = "top_examples.json"


class TopK:
    """Running exact top-k per column of a stream of [n, F] matrices, with global row indices."""

    def __init__(self, k: int, n_columns: int):
        self.k = k
        self.values_kf = torch.full((0, n_columns), float("-inf"))
        self.rows_kf = torch.zeros((0, n_columns), dtype=torch.long)
        self.seen = 0

    def update(self, values_nf: torch.Tensor) -> None:
        rows_nf = torch.arange(self.seen, self.seen + values_nf.shape[0]).unsqueeze(1).expand_as(values_nf)
        self.seen += values_nf.shape[0]
        values = torch.cat([self.values_kf, values_nf.float()])
        rows = torch.cat([self.rows_kf, rows_nf])
        # stable sort so equal values keep the earlier row first
        order = torch.sort(values, dim=0, descending=True, stable=True).indices[: self.k]
        self.values_kf = values.gather(0, order)
        self.rows_kf = rows.gather(0, order)


class LabelSummary(BaseModel):
    labels: str
    rows: int
    n_latents: int
    latents_with_examples: int


@torch.no_grad()
def run_label(config: LabelConfig) -> LabelSummary:
    storage.check_writable(config.output)
    sae = SparseAutoencoder.load(config.sae).eval()
    top = TopK(config.top_k, sae.config.n_latents)
    source_ids: list[str] = []
    for x_nd, ids, _ in store.iter_shards(config.activations):
        source_ids.extend(ids)
        for start in range(0, x_nd.shape[0], config.batch_size):
            top.update(sae.encode(x_nd[start : start + config.batch_size].float()))
    latents = {}
    for latent in range(sae.config.n_latents):
        examples = [
            {"source_id": source_ids[row], "activation": value}
            for value, row in zip(
                top.values_kf[:, latent].tolist(), top.rows_kf[:, latent].tolist(), strict=True
            )
            if value > 0  # a latent that never fires has no top examples
        ]
        latents[str(latent)] = examples
    uri = storage.join(config.output, LABELS_FILE)
    storage.write_text(
        uri, json.dumps({"sae": config.sae, "activations": config.activations, "latents": latents})
    )
    summary = LabelSummary(
        labels=uri,
        rows=len(source_ids),
        n_latents=sae.config.n_latents,
        latents_with_examples=sum(bool(examples) for examples in latents.values()),
    )
    write_run_info(config.output, "label", config, **summary.model_dump())
    return summary
