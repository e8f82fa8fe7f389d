"""Each latent's exact top-k activating rows of an activation dataset, as a Ray Data map-merge.

Map (one Ray task per shard, on a GPU when the cluster has them; `vlsae_ray.devices`): encode the
shard with the SAE into sparse latents (no dense [rows, F] matrix), keep each latent's k largest
activations with their global row ids (the row's position in the dataset: shards in manifest
order, rows in shard order), and count how often each latent fires. Merge (in the driver, as the
shard results arrive): the top-k of the union of kept and new candidates. Ties go to the smaller
global row id at every step, so the result equals one sorted pass over the whole dataset
whatever the shard order, the arrival order or the batch size.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import torch

from vlsae_ray import progress
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import shard_dataset
from vlsae_ray.devices import assigned_device
from vlsae_ray.eval.top_rows import NO_ROW, TopK
from vlsae_ray.sae.base import load_sae


class TopExamples(NamedTuple):
    values_kf: torch.Tensor  # [k, F] activations, largest first (k = min(top_k, rows))
    rows_kf: torch.Tensor  # [k, F] their global rows in the dataset
    source_ids: dict[int, str]  # global row -> source id, for every row in rows_kf
    firing_count_f: torch.Tensor  # [F] rows on which each latent is positive
    rows: int  # rows in the dataset


@torch.no_grad()
def _shard_top_k(batch: dict, dataset: str, sae_uri: str, k: int, batch_size: int) -> dict:
    """The map step: one shard's top-k per latent, its firing counts and the source ids of its top rows."""
    device = assigned_device()
    sae = load_sae(sae_uri).to(device)
    record = store.ShardRecord.model_validate_json(str(batch["record"][0]))
    offset = int(batch["offset"][0])
    x_nd, source_ids, _ = store.read_shard(dataset, record)
    top = TopK(k, sae.config.n_latents)
    firing_f = torch.zeros(sae.config.n_latents, dtype=torch.long)
    for start in range(0, x_nd.shape[0], batch_size):
        z = sae.encode_sparse(x_nd[start : start + batch_size].float().to(device)).to("cpu")
        top.update(z, first_row=offset + start)
        firing_f += torch.bincount(z.indices_n[z.values_n > 0], minlength=sae.config.n_latents)
    missing = k - top.values_kf.shape[0]  # fewer rows than k: pad, so every shard's result is [k, F]
    values_kf = torch.cat([top.values_kf, torch.full((missing, top.values_kf.shape[1]), float("-inf"))])
    rows_kf = torch.cat([top.rows_kf, torch.full((missing, top.rows_kf.shape[1]), NO_ROW)])
    kept = top.rows_kf.unique().tolist()
    return {
        "values_kf": values_kf[None].numpy(),
        "rows_kf": rows_kf[None].numpy(),
        "firing_f": firing_f[None].numpy(),
        "source_ids": np.array([json.dumps({row: source_ids[row - offset] for row in kept})]),
    }


def top_examples(dataset: str, sae_uri: str, k: int, batch_size: int = 1024, gpus: float = 0) -> TopExamples:
    """Each latent's exact top-k rows of `dataset` under the SAE at `sae_uri`, on the Ray cluster.

    Each map task requests `gpus` GPUs (`vlsae_ray.devices.gpu_request` decides how many).
    """
    sae = load_sae(sae_uri)
    manifest = store.read_manifest(dataset)
    if manifest.d != sae.config.d_in:
        raise ValueError(
            f"SAE {sae_uri!r} takes d_in={sae.config.d_in} but {dataset!r} has d={manifest.d}; "
            "label the dataset the SAE was trained on"
        )
    n_latents = sae.config.n_latents
    top = TopK(k, n_latents)
    firing_f = torch.zeros(n_latents, dtype=torch.long)
    source_ids: dict[int, str] = {}
    shards = shard_dataset(dataset).map_batches(
        _shard_top_k,
        fn_kwargs={"dataset": dataset, "sae_uri": sae_uri, "k": k, "batch_size": batch_size},
        batch_size=1,
        num_gpus=gpus,
    )
    for result in shards.iter_rows():
        top.merge(torch.tensor(result["values_kf"]), torch.tensor(result["rows_kf"]))
        firing_f += torch.tensor(result["firing_f"])
        source_ids.update({int(row): name for row, name in json.loads(str(result["source_ids"])).items()})
        progress.advance()
    kept = min(k, manifest.rows)
    rows_kf = top.rows_kf[:kept]
    return TopExamples(
        values_kf=top.values_kf[:kept],
        rows_kf=rows_kf,
        source_ids={row: source_ids[row] for row in rows_kf.unique().tolist()},
        firing_count_f=firing_f,
        rows=manifest.rows,
    )
