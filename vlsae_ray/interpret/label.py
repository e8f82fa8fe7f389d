"""The label job (`vlsae label -c CONFIG`): every latent's exact top-k examples, for a VL-SAE its
top captions too, a name from the vocabulary with a confidence, all written to the concept catalog.

Passes, each a Ray Data map over shards: the top-k of the activation dataset (and of the
text-side dataset for a VL-SAE; `top_examples`, whose tasks request `gpus_per_task` GPUs when
the Ray cluster has GPUs and `device` allows), then, to name by top images, one pass over the
embedding dataset that fetches the embeddings of the top rows' items and sums all unit
embeddings. The vocabulary is embedded once in the driver.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from pydantic import BaseModel

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import shard_dataset
from vlsae_ray.activations.sources import source_items
from vlsae_ray.config import BackboneConfig, LabelConfig, SourceConfig
from vlsae_ray.devices import gpu_request
from vlsae_ray.eval.metrics import nan_to_none
from vlsae_ray.interpret.catalog import CATALOG_FILE, write_catalog
from vlsae_ray.interpret.naming import (
    Names,
    TextEncoder,
    concept_embeddings,
    load_vocabulary,
    name_latents,
    top_image_directions,
)
from vlsae_ray.interpret.top_examples import TopExamples, top_examples
from vlsae_ray.local_stack import connect_ray
from vlsae_ray.provenance import write_run_info
from vlsae_ray.sae import checkpoint
from vlsae_ray.sae.base import load_sae
from vlsae_ray.world import MODEL_NAME


class LabelSummary(BaseModel):
    catalog: str
    rows: int
    n_latents: int
    latents_with_examples: int
    naming: str
    latents_named: int


def default_text_model(dataset: str) -> BackboneConfig:
    """The backbone that made `dataset`, when the manifest's model name is enough to load it."""
    from vlsae_ray.backbones import builtin_backbone

    model = store.read_manifest(dataset).model
    if model == MODEL_NAME:
        return builtin_backbone()
    raise ValueError(
        f"dataset {dataset!r} was made by model {model!r}, whose weights its manifest does not name: set "
        "`text_model` in the label config to that model's backbone config (library, model, pretrained)"
    )


def _shard_embeddings(batch: dict, dataset: str, wanted: frozenset[str]) -> dict:
    """The map step of naming by top images: unit embeddings of wanted items, and the shard's sum."""
    record = store.ShardRecord.model_validate_json(str(batch["record"][0]))
    e_nd, source_ids, _ = store.read_shard(dataset, record)
    unit_nd = torch.nn.functional.normalize(e_nd.float(), dim=-1)
    first_row = {}
    for row, source_id in enumerate(source_ids):
        if source_id in wanted:
            first_row.setdefault(source_id, row)
    return {
        "source_ids": np.array([json.dumps(list(first_row))]),
        "unit": np.array([unit_nd[list(first_row.values())].numpy().tobytes()], dtype=object),
        "sum_d": unit_nd.sum(0)[None].numpy(),
        "rows": np.array([len(source_ids)]),
    }


def _top_image_directions(embeddings: str, images: TopExamples, valid_kf: torch.Tensor) -> torch.Tensor:
    """[F, D] directions of `naming.top_image_directions` from the embedding dataset, on the cluster.

    Embeddings pair with the activations by source id, so an activation dataset with several rows
    per item (token modes) pairs with an embedding dataset of one row per item.
    """
    wanted = frozenset(images.source_ids.values())
    d = store.read_manifest(embeddings).d
    unit_by_id: dict[str, torch.Tensor] = {}
    sum_d, n_rows = torch.zeros(d), 0
    results = shard_dataset(embeddings).map_batches(
        _shard_embeddings, fn_kwargs={"dataset": embeddings, "wanted": wanted}, batch_size=1
    )
    for result in results.iter_rows():
        unit_nd = torch.from_numpy(np.frombuffer(result["unit"], dtype=np.float32).reshape(-1, d).copy())
        unit_by_id.update(zip(json.loads(str(result["source_ids"])), unit_nd, strict=True))
        sum_d += torch.tensor(result["sum_d"])
        n_rows += int(result["rows"])
    missing = sorted(wanted - unit_by_id.keys())
    if missing:
        raise ValueError(
            f"embeddings {embeddings!r} lack {len(missing)} items of the activations (e.g. {missing[0]!r}); "
            "extract both from the same source, in one job"
        )
    ids = sorted(unit_by_id)
    position = {source_id: i for i, source_id in enumerate(ids)}
    index_kf = torch.tensor(
        [[position[images.source_ids[row]] for row in rows_f] for rows_f in images.rows_kf.tolist()]
    )
    top_unit_kfd = torch.stack([unit_by_id[source_id] for source_id in ids])[index_kf]
    return top_image_directions(top_unit_kfd, valid_kf, sum_d / max(n_rows, 1))


def _captions(dataset: str, source_ids: set[str]) -> dict[str, str | None]:
    """The captions of `source_ids`, from the source the dataset's manifest records."""
    source = SourceConfig.model_validate(store.read_manifest(dataset).source)
    return {item["id"]: item["caption"] for item in source_items(source) if item["id"] in source_ids}


def _examples(top: TopExamples, latent: int, text: dict[str, str | None] | None = None):
    """(source ids or their captions, activations) of a latent's positive top rows, largest first."""
    pairs = [
        (top.source_ids[row], value)
        for value, row in zip(top.values_kf[:, latent].tolist(), top.rows_kf[:, latent].tolist(), strict=True)
        if value > 0  # a latent that never fires has no top examples
    ]
    return [text[i] if text is not None else i for i, _ in pairs], [value for _, value in pairs]


def _names(config: LabelConfig, images: TopExamples, vocabulary: list[str]) -> tuple[str, Names | None]:
    method = config.naming_method
    if method == "none":
        return method, None
    encoder = TextEncoder(
        config.text_model
        or default_text_model(config.embeddings if method == "top_images" else config.activations)
    )
    concepts_vd = concept_embeddings(encoder, vocabulary, config.prompts)
    if method == "top_images":
        directions_fd = _top_image_directions(config.embeddings, images, images.values_kf > 0)
    else:
        fired_f = images.firing_count_f > 0  # a dead latent's decoder row means nothing
        directions_fd = torch.where(fired_f[:, None], load_sae(config.sae).W_dec_fd.detach().float(), 0.0)
    return method, name_latents(directions_fd, concepts_vd, vocabulary, encoder.logit_scale)


@torch.no_grad()
def run_label(config: LabelConfig) -> LabelSummary:
    storage.check_writable(config.output)
    sae = load_sae(config.sae)
    if config.text_activations is not None and sae.config.architecture != "vl_sae":
        raise ValueError(
            f"text_activations is for a VL-SAE, but {config.sae!r} is a {sae.config.architecture!r} SAE: "
            "remove text_activations or label a vl_sae checkpoint"
        )
    # a bad vocabulary fails before the passes
    vocabulary = load_vocabulary(config.vocabulary) if config.naming_method != "none" else []
    connect_ray()
    gpus = gpu_request(config.device, config.gpus_per_task, "label's SAE tasks", "gpus_per_task")
    images = top_examples(config.activations, config.sae, config.top_k, config.batch_size, gpus)
    texts = captions = None
    if config.text_activations is not None:
        texts = top_examples(config.text_activations, config.sae, config.top_k, config.batch_size, gpus)
        captions = _captions(config.text_activations, set(texts.source_ids.values()))
    method, names = _names(config, images, vocabulary)

    n_latents = sae.config.n_latents
    columns: dict[str, list] = {name: [] for name in ("top_source_ids", "top_activations")}
    columns |= {"top_captions": [], "top_caption_activations": []}
    for latent in range(n_latents):
        ids, values = _examples(images, latent)
        columns["top_source_ids"].append(ids)
        columns["top_activations"].append(values)
        caption_list, caption_values = _examples(texts, latent, captions) if texts else (None, None)
        columns["top_captions"].append(caption_list)
        columns["top_caption_activations"].append(caption_values)
    # a sharded checkpoint's index lists every shard file's SHA-256, so its hash names the weights too
    sha256 = hashlib.sha256(storage.read_bytes(checkpoint.commit_uri(config.sae))).hexdigest()
    columns |= {
        "sae": [config.sae] * n_latents,
        "sae_sha256": [sha256] * n_latents,
        "latent": list(range(n_latents)),
        "name": names.name if names else [None] * n_latents,
        "runner_up": names.runner_up if names else [None] * n_latents,
        "similarity": nan_to_none(names.similarity) if names else [None] * n_latents,
        "confidence": nan_to_none(names.confidence) if names else [None] * n_latents,
        "firing_count": images.firing_count_f.tolist(),
        "steerability": [None] * n_latents,  # the steer job measures it
    }
    catalog = storage.join(config.output, CATALOG_FILE)
    write_catalog(catalog, columns, config.model_dump(mode="json"))
    summary = LabelSummary(
        catalog=catalog,
        rows=images.rows,
        n_latents=n_latents,
        latents_with_examples=int((images.firing_count_f > 0).sum()),
        naming=method,
        latents_named=sum(name is not None for name in names.name) if names else 0,
    )
    write_run_info(config.output, "label", config, **summary.model_dump())
    return summary
