"""Each latent's exact top-k activating rows of an activation dataset and the histogram of its
positive activations, as a Ray Data map-merge.

Map (one Ray task per shard, on a GPU when the cluster has them; `vlsae_ray.devices`): encode the
shard with the SAE into sparse latents (no dense [rows, F] matrix), keep each latent's k largest
activations with their global row ids (the row's position in the dataset: shards in manifest
order, rows in shard order), and count its positive activations in the fixed bins
`HISTOGRAM_EDGES` (only the non-empty (latent, bin) counts leave the task). Merge (in the driver,
as the shard results arrive): the top-k of the union of kept and new candidates, and the sum of
the counts. Ties go to the smaller global row id at every step, so the result equals one sorted
pass over the whole dataset whatever the shard order, the arrival order or the batch size.

The histogram's bins are the same for every latent and shard, so shard counts add up exactly
without knowing a latent's range in advance: log-spaced, 4 per octave from 2^-16 to 2^16 (each
bin about 19% wider than the last), an activation outside that range counted in the end bin.
"""

from __future__ import annotations

import json
import pickle
from typing import NamedTuple

import numpy as np
import torch

from vlsae_ray import progress
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import shard_dataset
from vlsae_ray.devices import assigned_device
from vlsae_ray.eval.top_rows import NO_ROW, TopK
from vlsae_ray.sae.base import load_sae

HISTOGRAM_EDGES = 2.0 ** (torch.arange(-64, 65, dtype=torch.float32) / 4)
HISTOGRAM_BINS = len(HISTOGRAM_EDGES) - 1


def histogram_bins(values_n: torch.Tensor) -> torch.Tensor:
    """The bin of `HISTOGRAM_EDGES` of each positive activation, as `numpy.histogram` assigns them
    (bins closed on the left, the last also on the right), out-of-range values in the end bins."""
    edges = HISTOGRAM_EDGES.to(values_n.device)
    inside = values_n.float().clamp(edges[0], edges[-1])
    return (torch.bucketize(inside, edges, right=True) - 1).clamp(max=HISTOGRAM_BINS - 1)


def trimmed_histogram(counts_b: torch.Tensor) -> tuple[list[float] | None, list[int] | None]:
    """(edges, counts) of one latent's histogram over its non-empty span of bins; None for a latent
    that never fired."""
    filled = counts_b.nonzero().flatten()
    if not len(filled):
        return None, None
    first, last = int(filled[0]), int(filled[-1])
    return HISTOGRAM_EDGES[first : last + 2].tolist(), counts_b[first : last + 1].tolist()


class TopExamples(NamedTuple):
    values_kf: torch.Tensor  # [k, F] activations, largest first (k = min(top_k, rows))
    rows_kf: torch.Tensor  # [k, F] their global rows in the dataset
    source_ids: dict[int, str]  # global row -> source id, for every row in rows_kf
    histogram_fb: torch.Tensor  # [F, HISTOGRAM_BINS] each latent's positive activations, counted by bin
    rows: int  # rows in the dataset

    @property
    def firing_count_f(self) -> torch.Tensor:
        """[F] rows on which each latent is positive."""
        return self.histogram_fb.sum(1)


@torch.no_grad()
def _shard_top_k(batch: dict, dataset: str, sae_uri: str, k: int, batch_size: int) -> dict:
    """The map step: one shard's top-k per latent, its histogram counts and the source ids of its top rows."""
    device = assigned_device()
    sae = load_sae(sae_uri).to(device)
    record = store.ShardRecord.model_validate_json(str(batch["record"][0]))
    offset = int(batch["offset"][0])
    x_nd, source_ids, _ = store.read_shard(dataset, record)
    top = TopK(k, sae.config.n_latents)
    keys, counts = [], []  # the non-empty (latent, bin) pairs, as latent * HISTOGRAM_BINS + bin
    for start in range(0, x_nd.shape[0], batch_size):
        z = sae.encode_sparse(x_nd[start : start + batch_size].float().to(device)).to("cpu")
        top.update(z, first_row=offset + start)
        fired = z.values_n > 0
        key, count = torch.unique(
            z.indices_n[fired] * HISTOGRAM_BINS + histogram_bins(z.values_n[fired]), return_counts=True
        )
        keys.append(key)
        counts.append(count)
    missing = k - top.values_kf.shape[0]  # fewer rows than k: pad, so every shard's result is [k, F]
    values_kf = torch.cat([top.values_kf, torch.full((missing, top.values_kf.shape[1]), float("-inf"))])
    rows_kf = torch.cat([top.rows_kf, torch.full((missing, top.rows_kf.shape[1]), NO_ROW)])
    kept = top.rows_kf.unique().tolist()
    return {
        "values_kf": values_kf[None].numpy(),
        "rows_kf": rows_kf[None].numpy(),
        "histogram_keys": np.array([pickle.dumps(torch.cat(keys))], dtype=object),
        "histogram_counts": np.array([pickle.dumps(torch.cat(counts))], dtype=object),
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
    histogram = torch.zeros(n_latents * HISTOGRAM_BINS, dtype=torch.long)
    source_ids: dict[int, str] = {}
    shards = shard_dataset(dataset).map_batches(
        _shard_top_k,
        fn_kwargs={"dataset": dataset, "sae_uri": sae_uri, "k": k, "batch_size": batch_size},
        batch_size=1,
        num_gpus=gpus,
    )
    for result in shards.iter_rows():
        top.merge(torch.tensor(result["values_kf"]), torch.tensor(result["rows_kf"]))
        histogram.index_add_(
            0, pickle.loads(result["histogram_keys"]), pickle.loads(result["histogram_counts"])
        )
        source_ids.update({int(row): name for row, name in json.loads(str(result["source_ids"])).items()})
        progress.advance()
    kept = min(k, manifest.rows)
    rows_kf = top.rows_kf[:kept]
    return TopExamples(
        values_kf=top.values_kf[:kept],
        rows_kf=rows_kf,
        source_ids={row: source_ids[row] for row in rows_kf.unique().tolist()},
        histogram_fb=histogram.view(n_latents, HISTOGRAM_BINS),
        rows=manifest.rows,
    )
