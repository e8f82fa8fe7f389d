"""The label job (`vlsae label -c CONFIG`): every latent's exact top-k examples, for a VL-SAE its
top captions too, a name from the vocabulary (or none) with a confidence and a held-out AUROC, all
written to the concept catalog, and a report (`report.md`, and `reliability.png` where the items
carry ground truth).

Passes, each a Ray Data map over shards whose tasks request `gpus_per_task` GPUs when the Ray
cluster has GPUs and `device` allows: the top-k of the activation dataset (and of the text-side
dataset for a VL-SAE; `top_examples`), then for naming `concept_pass` over the activation shards
and the embedding shards of the same items: the SAE's latents against every concept's zero-shot
probability (`naming.PatternSums`, on the items outside the held-out fold), the embeddings of the
top rows' items and the held-out fold's rows for scoring names. For a VL-SAE named by
`activations`, a second such pass over its captions (their embeddings are its text rows). The
vocabulary is embedded once in the driver. Methods and confidence: `vlsae_ray.interpret.naming`.

At scale: each task returns sums over the latents that fired in its shard (`naming.ShardSums`,
U x V for U such latents and V concepts), the driver holds the F x V sums (8 bytes each), and the
held-out fold's rows (V scores and the firing latents per row) come to the driver.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from typing import NamedTuple

import numpy as np
import torch
from pydantic import BaseModel

from vlsae_ray import progress, storage
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import shard_dataset
from vlsae_ray.activations.sources import source_items
from vlsae_ray.config import BackboneConfig, LabelConfig, SourceConfig
from vlsae_ray.devices import assigned_device, gpu_request
from vlsae_ray.eval import plots
from vlsae_ray.eval.metrics import nan_to_none
from vlsae_ray.interpret.catalog import CATALOG_FILE, write_catalog
from vlsae_ray.interpret.ground_truth import held_names, reliability
from vlsae_ray.interpret.naming import (
    Names,
    PatternSums,
    ShardSums,
    TextEncoder,
    Vocabulary,
    calibrated_confidence,
    clip_dissect_scores,
    concept_embeddings,
    heldout_auroc,
    in_heldout_fold,
    load_vocabulary,
    name_latents,
    names_from_scores,
    specific_names,
    top_image_directions,
    top_share,
    zero_shot_log_probability,
)
from vlsae_ray.interpret.top_examples import TopExamples, top_examples, trimmed_histogram
from vlsae_ray.local_stack import connect_ray
from vlsae_ray.provenance import write_run_info
from vlsae_ray.sae import checkpoint
from vlsae_ray.sae.base import load_config, load_sae
from vlsae_ray.world import MODEL_NAME


class LabelSummary(BaseModel):
    catalog: str
    report: str | None = None  # report.md: the names' counts, held-out AUROC and reliability
    rows: int
    n_latents: int
    latents_with_examples: int
    naming: str
    latents_named: int
    latents_unnamed: int  # fired, but no concept of the vocabulary explains them (their name is null)


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


class ConceptPass(NamedTuple):
    """What naming needs from one pass over paired activation and embedding shards."""

    sums: PatternSums  # latents against the concepts' zero-shot probabilities, naming fold
    mean_unit_d: torch.Tensor  # the mean unit embedding of all rows
    unit_by_id: dict[str, torch.Tensor]  # unit embeddings of the wanted items
    heldout_s_nv: torch.Tensor  # the concepts' log-probabilities on the held-out fold's rows
    heldout_rows_n: torch.Tensor  # (row, latent) where latents fire on the held-out fold
    heldout_latents_n: torch.Tensor


def _shard_concepts(batch: dict, activations: str, embeddings: str, shards: dict[str, str], **kwargs) -> dict:
    """The map step of naming: one activation shard and the embedding shard of the same name."""
    device = assigned_device()
    sae = load_sae(kwargs["sae_uri"]).to(device)
    record = store.ShardRecord.model_validate_json(str(batch["record"][0]))
    if record.name not in shards:
        raise ValueError(
            f"embeddings {embeddings!r} have no shard {record.name!r} of {activations!r}; "
            "extract both from the same source, in one job"
        )
    x_nd, source_ids, _ = store.read_shard(activations, record)
    e_md, embedding_ids, _ = store.read_shard(
        embeddings, store.ShardRecord.model_validate_json(shards[record.name])
    )
    position = {}
    for row, source_id in enumerate(embedding_ids):
        position.setdefault(source_id, row)
    missing = [source_id for source_id in source_ids if source_id not in position]
    if missing:
        raise ValueError(
            f"embeddings {embeddings!r} lack {len(missing)} items of the activations (e.g. {missing[0]!r}); "
            "extract both from the same source, in one job"
        )
    unit_nd = torch.nn.functional.normalize(e_md[[position[i] for i in source_ids]].float(), dim=-1)
    concepts_vd = torch.tensor(kwargs["concepts_vd"])
    log_p_nv = zero_shot_log_probability(
        unit_nd, concepts_vd, kwargs["logit_scale"], torch.tensor(kwargs["block_v"])
    )
    rows, latents, values = [], [], []
    for start in range(0, x_nd.shape[0], kwargs["batch_size"]):
        z = sae.encode_sparse(x_nd[start : start + kwargs["batch_size"]].float().to(device)).to("cpu")
        fired = z.values_n > 0
        rows.append(z.rows_n[fired] + start)
        latents.append(z.indices_n[fired])
        values.append(z.values_n[fired].float())
    rows_n, latents_n, values_n = torch.cat(rows), torch.cat(latents), torch.cat(values)
    heldout = torch.tensor([in_heldout_fold(i, kwargs["heldout_fraction"]) for i in source_ids])
    # rows renumbered within each fold
    fold_row = torch.where(heldout, heldout.cumsum(0) - 1, (~heldout).cumsum(0) - 1)
    named = ~heldout[rows_n]
    sums = ShardSums.of(fold_row[rows_n[named]], latents_n[named], values_n[named], log_p_nv[~heldout].exp())
    wanted = {}
    for row, source_id in enumerate(source_ids):
        if source_id in kwargs["wanted"]:
            wanted.setdefault(source_id, row)
    return {
        "sums": np.array([pickle.dumps(sums)], dtype=object),
        "unit_sum_d": unit_nd.sum(0)[None].numpy(),
        "wanted_ids": np.array([json.dumps(list(wanted))]),
        "wanted_unit": np.array([pickle.dumps(unit_nd[list(wanted.values())])], dtype=object),
        "heldout": np.array(
            [pickle.dumps((log_p_nv[heldout], fold_row[rows_n[~named]], latents_n[~named]))], dtype=object
        ),
    }


def concept_pass(
    activations: str,
    embeddings: str,
    sae_uri: str,
    concepts_vd: torch.Tensor,
    block_v: torch.Tensor,
    logit_scale: float,
    wanted: set[str],
    heldout_fraction: float,
    batch_size: int = 1024,
    gpus: float = 0,
) -> ConceptPass:
    """One Ray Data pass over `activations` and the `embeddings` of the same items: everything naming
    needs, with the items of the held-out fold (`in_heldout_fold`) kept apart for scoring names."""
    shards = {record.name: record.model_dump_json() for record in store.read_manifest(embeddings).shards}
    results = shard_dataset(activations).map_batches(
        _shard_concepts,
        fn_kwargs={
            "activations": activations,
            "embeddings": embeddings,
            "shards": shards,
            "sae_uri": sae_uri,
            "concepts_vd": concepts_vd.numpy(),
            "block_v": block_v.numpy(),
            "logit_scale": logit_scale,
            "wanted": frozenset(wanted),
            "heldout_fraction": heldout_fraction,
            "batch_size": batch_size,
        },
        batch_size=1,
        num_gpus=gpus,
    )
    sums = PatternSums.zeros(load_config(sae_uri).n_latents, len(concepts_vd))
    unit_sum_d, unit_by_id, heldout = 0, {}, []
    for result in results.iter_rows():
        sums.add_(pickle.loads(result["sums"]))
        unit_sum_d = unit_sum_d + torch.tensor(result["unit_sum_d"])
        wanted_ids, wanted_unit = json.loads(str(result["wanted_ids"])), pickle.loads(result["wanted_unit"])
        unit_by_id.update(zip(wanted_ids, wanted_unit, strict=True))
        heldout.append(pickle.loads(result["heldout"]))
        progress.advance()
    first_row = np.cumsum([0] + [s_nv.shape[0] for s_nv, _, _ in heldout])
    all_rows = (sums.rows + int(first_row[-1])).clamp_min(1).float()
    return ConceptPass(
        sums=sums,
        mean_unit_d=unit_sum_d / all_rows,
        unit_by_id=unit_by_id,
        heldout_s_nv=torch.cat([s_nv for s_nv, _, _ in heldout]),
        heldout_rows_n=torch.cat(
            [rows + int(first) for (_, rows, _), first in zip(heldout, first_row[:-1], strict=True)]
        ),
        heldout_latents_n=torch.cat([latents for _, _, latents in heldout]),
    )


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


class Naming(NamedTuple):
    method: str
    names: Names
    heldout_auroc_f: torch.Tensor  # [F] the name's held-out AUROC (NaN where it could not be scored)


def _top_units(concepts: ConceptPass, images: TopExamples) -> tuple[torch.Tensor, torch.Tensor]:
    """([U, D] the unit embeddings of the top rows' items, then a zero row; [k, F] each latent's top
    rows as indices into it, the zero row for rows past its last firing)."""
    ids = sorted(concepts.unit_by_id)
    table_ud = torch.stack([concepts.unit_by_id[i] for i in ids] + [torch.zeros_like(concepts.mean_unit_d)])
    position = {source_id: i for i, source_id in enumerate(ids)}
    none = len(ids)
    index_kf = torch.tensor(
        [[position.get(images.source_ids.get(row), none) for row in rows] for rows in images.rows_kf.tolist()]
    )
    return table_ud, index_kf


def _heldout_auroc(passes: list[ConceptPass], concept_f: torch.Tensor) -> torch.Tensor:
    """The names' held-out AUROC over the held-out rows of every pass (images, and captions for a VL-SAE)."""
    if not passes:
        return torch.full(concept_f.shape, float("nan"))
    first = np.cumsum([0] + [p.heldout_s_nv.shape[0] for p in passes])
    return heldout_auroc(
        torch.cat([p.heldout_s_nv for p in passes]),
        torch.cat([p.heldout_rows_n + int(row) for p, row in zip(passes, first, strict=False)]),
        torch.cat([p.heldout_latents_n for p in passes]),
        concept_f,
    )


def _names(config: LabelConfig, images: TopExamples, vocabulary: Vocabulary, gpus: float) -> Naming | None:
    method = config.naming_method
    if method == "none":
        return None
    encoder = TextEncoder(config.text_model or default_text_model(config.embeddings or config.activations))
    concepts_vd = concept_embeddings(encoder, vocabulary, config.prompts)
    scale, passes = encoder.logit_scale, []
    width = concepts_vd.shape[1]
    if config.embeddings is not None and store.read_manifest(config.embeddings).d != width:
        raise ValueError(
            f"embeddings {config.embeddings!r} have width {store.read_manifest(config.embeddings).d} but "
            f"the text model embeds concepts in width {width}: name with the CLIP whose image embeddings "
            "these are (`text_model`)"
        )
    if config.embeddings is not None:
        passes.append(
            concept_pass(
                config.activations, config.embeddings, config.sae, concepts_vd, vocabulary.block_v, scale,
                set(images.source_ids.values()), config.heldout_fraction, config.batch_size, gpus,
            )
        )  # fmt: skip
        # a VL-SAE on CLIP embeddings: its text rows are caption embeddings in the concepts' space
        texts = config.text_activations
        if method == "activations" and texts is not None and store.read_manifest(texts).d == width:
            passes.append(
                concept_pass(
                    config.text_activations, config.text_activations, config.sae, concepts_vd,
                    vocabulary.block_v, scale, set(), config.heldout_fraction, config.batch_size, gpus,
                )
            )  # fmt: skip
    valid_kf, live_f = images.values_kf > 0, images.firing_count_f > 0
    if passes:
        table_ud, index_kf = _top_units(passes[0], images)
        log_p_uv = zero_shot_log_probability(table_ud, concepts_vd, scale, vocabulary.block_v)
    if method == "activations":
        sums = passes[0].sums
        for extra in passes[1:]:
            sums = sums + extra.sums
        names = specific_names(sums.agreement(), sums.mean_p(), vocabulary)
    elif method == "clip_dissect":
        scores_fv = clip_dissect_scores(log_p_uv[index_kf], valid_kf, passes[0].sums.mean_p())
        names = names_from_scores(torch.where(live_f[:, None], scores_fv, float("nan")), vocabulary)
        names = names._replace(confidence=scores_fv.softmax(-1).max(-1).values.where(live_f, float("nan")))
    elif method == "top_images":
        directions_fd = top_image_directions(table_ud[index_kf], valid_kf, passes[0].mean_unit_d)
        names = name_latents(directions_fd, concepts_vd, vocabulary, scale)
    else:
        # a dead latent's decoder row means nothing
        directions_fd = torch.where(live_f[:, None], load_sae(config.sae).W_dec_fd.detach().float(), 0.0)
        names = name_latents(directions_fd, concepts_vd, vocabulary, scale)
    index = {concept: v for v, concept in enumerate(vocabulary)}
    concept_f = torch.tensor([index.get(name, -1) for name in names.name])
    auroc_f = _heldout_auroc(passes, concept_f)
    if method == "activations":
        # unnamed: its top images do not hold its best concept (no concept of the vocabulary explains it)
        top_p_kf = log_p_uv[index_kf, concept_f.clamp_min(0)[None]].exp()
        confidence_f = calibrated_confidence(top_share(top_p_kf, valid_kf))
        keep = (confidence_f >= config.min_confidence).tolist()
        names = names._replace(
            name=[name if ok else None for name, ok in zip(names.name, keep, strict=True)],
            confidence=torch.where(concept_f >= 0, confidence_f, float("nan")),
        )
    return Naming(method, names, auroc_f)


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
    with progress.stage("label", _shard_tasks(config), "shards"):
        return _label(config, sae, vocabulary, gpus)


def _shard_tasks(config: LabelConfig) -> int:
    """The label job's shard tasks: top examples, then naming's pass, on each side."""
    images = len(store.read_manifest(config.activations).shards)
    texts = len(store.read_manifest(config.text_activations).shards) if config.text_activations else 0
    naming = config.embeddings is not None and config.naming_method != "none"
    return images + texts + naming * (images + texts * (config.naming_method == "activations"))


def _label(config: LabelConfig, sae, vocabulary: Vocabulary, gpus: float) -> LabelSummary:
    images = top_examples(config.activations, config.sae, config.top_k, config.batch_size, gpus)
    texts = captions = None
    if config.text_activations is not None:
        texts = top_examples(config.text_activations, config.sae, config.top_k, config.batch_size, gpus)
        captions = _captions(config.text_activations, set(texts.source_ids.values()))
    naming = _names(config, images, vocabulary, gpus)
    names = naming.names if naming else None

    n_latents = sae.config.n_latents
    columns: dict[str, list] = {name: [] for name in ("top_source_ids", "top_activations")}
    columns |= {"top_captions": [], "top_caption_activations": []}
    columns |= {"histogram_edges": [], "histogram_counts": []}
    for latent in range(n_latents):
        ids, values = _examples(images, latent)
        columns["top_source_ids"].append(ids)
        columns["top_activations"].append(values)
        edges, counts = trimmed_histogram(images.histogram_fb[latent])
        columns["histogram_edges"].append(edges)
        columns["histogram_counts"].append(counts)
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
        "heldout_auroc": nan_to_none(naming.heldout_auroc_f) if naming else [None] * n_latents,
        "naming": [naming.method if naming else None] * n_latents,
        "firing_count": images.firing_count_f.tolist(),
        "steerability": [None] * n_latents,  # the steer job measures it
    }
    catalog = storage.join(config.output, CATALOG_FILE)
    write_catalog(catalog, columns, config.model_dump(mode="json"), images.rows)
    latents_named = sum(name is not None for name in names.name) if names else 0
    summary = LabelSummary(
        catalog=catalog,
        rows=images.rows,
        n_latents=n_latents,
        latents_with_examples=int((images.firing_count_f > 0).sum()),
        naming=naming.method if naming else "none",
        latents_named=latents_named,
        latents_unnamed=int((images.firing_count_f > 0).sum()) - latents_named if names else 0,
    )
    if naming is not None:
        summary.report = _write_report(config, columns, summary)
    write_run_info(config.output, "label", config, **summary.model_dump())
    return summary


def _write_report(config: LabelConfig, columns: dict[str, list], summary: LabelSummary) -> str:
    """report.md next to the catalog, and for items with ground truth (the concept world) a
    reliability diagram: how often names of each confidence are right (`ground_truth.held_names`)."""
    lines = [
        f"# Latent names of {config.sae}",
        "",
        f"Naming `{summary.naming}` with {'the default' if config.vocabulary is None else config.vocabulary} "
        f"vocabulary: {summary.latents_named} latents named, {summary.latents_unnamed} unnamed (no concept "
        f"explains them), {summary.n_latents - summary.latents_with_examples} never fire.",
    ]
    aurocs = [value for value in columns["heldout_auroc"] if value is not None]
    if aurocs:
        lines.append(
            f"Held-out AUROC of the names (how well a name predicts where its latent fires on the "
            f"{config.heldout_fraction:.0%} of items kept out of naming): median {np.median(aurocs):.2f} "
            f"over {len(aurocs)} names."
        )
    judged, right = [], []
    for name, confidence, ids in zip(
        columns["name"], columns["confidence"], columns["top_source_ids"], strict=True
    ):
        if name is None or confidence is None or len(ids) < config.top_k:
            continue
        held = held_names(ids)
        if held is None:  # not world items: no ground truth to check names against
            judged = []
            break
        judged.append(confidence)
        right.append(name in held)
    if judged:
        rows = reliability(judged, right)
        uri = storage.join(config.output, "reliability.png")
        storage.write_bytes(uri, plots.reliability(rows))
        sure = [ok for confidence, ok in zip(judged, right, strict=True) if confidence >= 0.8]
        lines += [
            "",
            f"## Reliability on the items' ground truth ({len(judged)} names, full top-{config.top_k})",
            "",
            "A name is right when all but at most one of the latent's top images hold its concept.",
            "",
            "| confidence | names | mean confidence | right |",
            "|---|---|---|---|",
            *(
                f"| {low:.1f}-{high:.1f} | {n} | {mean:.2f} | {share:.0%} |"
                for low, high, n, mean, share in rows
            ),
            "",
            f"Names with confidence >= 0.8: {len(sure)}, {sum(sure) / max(len(sure), 1):.0%} right.",
            "",
            "![reliability](reliability.png)",
        ]
    report = storage.join(config.output, "report.md")
    storage.write_text(report, "\n".join(lines) + "\n")
    return report
