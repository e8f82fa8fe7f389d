"""The label job end to end on a local Ray: names against the concept world's ground truth, the
catalog read back with DuckDB, and a VL-SAE's top captions on S3.

The meaning check: the SAE of `world_sae` (block-2 CLS activations of the world CLIP, the demo's
recipe) is named by its activation pattern (`naming: activations`, the default) with the world
vocabulary. A name is right when the world concept it names is held by at least 8 of the latent's 9
top images (`ground_truth.held_names`: top images often share two or three concepts, e.g. "three
large white objects", and any of them is a right name). Among the quarter of latents with a full
top-9 with the highest MS, `benchmarks/naming.py` measured 97% right (147 latents; binomial sd
about 1.5 points) on the default seed and 99% (134) on a held-out seed and split, where the
previous methods get 78% and 79% (`top_images`), 84% and 85% (correlation with the flat
log-probability) and CLIP-Dissect's SoftWPMI 65% and 72%; chance, a uniformly random name of the
30-concept vocabulary being right, is about 10%. We require the issue's 90% (about 5 sd under the
measurement) and 5 times chance on both. The calibration check: on the held-out seed, names given
with confidence >= 0.8 were 100% right (502 names) and those below 0.8 38% (13); we require the
issue's 95% for the confident ones and more than the rest.
"""

from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from vlsae_ray.backbones import Backbone, builtin_backbone
from vlsae_ray.config import LabelConfig
from vlsae_ray.eval import monosemanticity_score
from vlsae_ray.interpret import read_catalog, run_label
from vlsae_ray.interpret.ground_truth import WORLD_NAMES, held_names
from vlsae_ray.interpret.naming import (
    TextEncoder,
    concept_embeddings,
    in_heldout_fold,
    load_vocabulary,
    specific_names,
    zero_shot_log_probability,
)
from vlsae_ray.sae import SparseAutoencoder, build_sae
from vlsae_ray.world import generate_items, load_world_clip

TOP = 9
BLOCK, EMBEDDING = "visual.transformer.resblocks.2", "visual"  # as in conftest's world_sae


def _label(root: str, ids, x_nd, embeddings_ne, write_dataset) -> tuple[LabelConfig, object]:
    shards = [512, 512, 300, 212, 512]
    config = LabelConfig(
        sae=f"{root}/sae",
        activations=write_dataset(f"{root}/block", x_nd, ids, shards),
        embeddings=write_dataset(f"{root}/embedding", embeddings_ne, ids, shards),
        vocabulary="world",
        top_k=TOP,
        output=f"{root}/labels",
    )
    return config, run_label(config)


@pytest.fixture(scope="module")
def labelled_world(world_sae, tmp_path_factory, ray_cluster, write_dataset):
    ids, x_nd, _, embeddings_ne, sae = world_sae
    root = str(tmp_path_factory.mktemp("label"))
    sae.save(f"{root}/sae")
    return _label(root, ids, x_nd, embeddings_ne, write_dataset)


def _judge(catalog: list[dict], ms_f: torch.Tensor) -> tuple[list[dict], list[bool], float]:
    """(high-MS latents, whether each is named right, the chance rate)."""
    full = [row for row in catalog if len(row["top_source_ids"]) == TOP and not ms_f[row["latent"]].isnan()]
    high = sorted(full, key=lambda row: -ms_f[row["latent"]])[: len(full) // 4]
    assert len(high) >= 100, f"only {len(high)} high-MS latents to judge"
    right = [row["name"] in held_names(row["top_source_ids"]) for row in high]
    vocabulary = len(load_vocabulary("world"))
    chance = sum(len(held_names(row["top_source_ids"])) / vocabulary for row in high) / len(high)
    return high, right, chance


def test_high_ms_latents_get_names_of_their_ground_truth_concept(world_sae, labelled_world):
    assert set(WORLD_NAMES.values()) == set(load_vocabulary("world")) <= set(load_vocabulary())
    _, _, z_nf, embeddings_ne, _ = world_sae
    config, summary = labelled_world
    catalog = read_catalog(summary.catalog).to_pylist()
    assert summary.naming == "activations" and len(catalog) == z_nf.shape[1]
    high, right, chance = _judge(catalog, monosemanticity_score(z_nf, embeddings_ne))
    rate = sum(right) / len(high)
    print(f"\nnames matching ground truth: {rate:.0%} of {len(high)} high-MS latents (chance {chance:.1%})")
    assert rate >= 0.9 and rate >= 5 * chance, (rate, chance)


def test_the_other_naming_methods_side_by_side(world_sae, labelled_world):
    """Today's default against the previous method and CLIP-Dissect's, on the same SAE and data
    (benchmarks/naming.py measured 78% and 65% against 97%)."""
    _, _, z_nf, embeddings_ne, _ = world_sae
    config, summary = labelled_world
    ms_f = monosemanticity_score(z_nf, embeddings_ne)
    rates = {"activations": sum(_judge(read_catalog(summary.catalog).to_pylist(), ms_f)[1])}
    for method in ("top_images", "clip_dissect"):
        other = config.model_copy(update={"naming": method, "output": f"{config.output}-{method}"})
        catalog = read_catalog(run_label(other).catalog).to_pylist()
        assert {row["naming"] for row in catalog} == {method}
        rates[method] = sum(_judge(catalog, ms_f)[1])
    print(f"\nhigh-MS latents named right by method: {rates}")
    assert rates["activations"] >= max(rates["top_images"], rates["clip_dissect"]), rates


@pytest.fixture(scope="module")
def held_out_world(world_sae, tmp_path_factory, ray_cluster, write_dataset):
    """The same SAE labelled on a held-out seed and split (seed 2, test: unseen (shape, colour) pairs)."""
    _, _, _, _, sae = world_sae
    items = generate_items(2048, seed=2, split="test")
    backbone = Backbone(builtin_backbone())
    with torch.no_grad():
        pixels = torch.stack([backbone.preprocess(item.image) for item in items])
        acts = backbone.activations([BLOCK, EMBEDDING], pixels=pixels, item_ids=[item.id for item in items])
        z_nf = sae.encode(acts[BLOCK].values)
    root = str(tmp_path_factory.mktemp("held-out"))
    sae.save(f"{root}/sae")
    ids = [item.id for item in items]
    _, summary = _label(root, ids, acts[BLOCK].values, acts[EMBEDDING].values, write_dataset)
    catalog = read_catalog(summary.catalog).to_pylist()
    return catalog, monosemanticity_score(z_nf, acts[EMBEDDING].values), summary.report


def test_names_and_their_confidence_on_a_held_out_seed_and_split(held_out_world):
    catalog, ms_f, report = held_out_world
    high, right, chance = _judge(catalog, ms_f)
    rate = sum(right) / len(high)
    named = [row for row in catalog if row["name"] is not None and len(row["top_source_ids"]) == TOP]
    sure = [row["name"] in held_names(row["top_source_ids"]) for row in named if row["confidence"] >= 0.8]
    unsure = [row["name"] in held_names(row["top_source_ids"]) for row in named if row["confidence"] < 0.8]
    sure_rate, unsure_rate = sum(sure) / len(sure), sum(unsure) / len(unsure)
    print(
        f"\nheld-out seed: {rate:.0%} of {len(high)} high-MS latents named right (chance {chance:.1%}); "
        f"confidence >= 0.8: {sure_rate:.0%} of {len(sure)} right, below: {unsure_rate:.0%} of {len(unsure)}"
    )
    assert rate >= 0.9 and rate >= 5 * chance, (rate, chance)
    assert len(sure) >= 300 and sure_rate >= 0.95 and sure_rate > unsure_rate + 0.05
    # unnamed latents: they fired, and their best concept's confidence fell short of min_confidence
    unnamed = [row for row in catalog if row["name"] is None and row["firing_count"] > 0]
    assert unnamed and all(row["confidence"] is None or row["confidence"] < 0.5 for row in unnamed)
    # the label report's reliability table holds the same figures, beside its plot
    text = Path(report).read_text()
    assert f"Names with confidence >= 0.8: {len(sure)}, {sure_rate:.0%} right." in text
    png = Path(report).with_name("reliability.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    scored = [row["heldout_auroc"] for row in named if row["heldout_auroc"] is not None]
    assert len(scored) > 0.9 * len(named) and sum(scored) / len(scored) > 0.7  # names predict firing


def test_catalog_rows_are_the_exact_top_k_firing_counts_and_histograms(world_sae, labelled_world):
    ids, _, z_nf, _, _ = world_sae
    _, summary = labelled_world
    catalog = read_catalog(summary.catalog).to_pylist()
    expected = torch.sort(z_nf, dim=0, descending=True, stable=True)
    for row in catalog[::37]:
        j = row["latent"]
        rows, values = expected.indices[:TOP, j].tolist(), expected.values[:TOP, j].tolist()
        assert row["top_source_ids"] == [ids[i] for i, v in zip(rows, values, strict=True) if v > 0]
        assert row["top_activations"] == pytest.approx([v for v in values if v > 0], rel=1e-5)
        assert row["firing_count"] == int((z_nf[:, j] > 0).sum())
        if row["firing_count"]:  # the activation histogram: numpy's over the catalog's bins
            positive = z_nf[:, j][z_nf[:, j] > 0].numpy()
            edges = np.array(row["histogram_edges"], dtype=np.float32)
            assert row["histogram_counts"] == np.histogram(positive, bins=edges)[0].tolist()
        else:
            assert row["histogram_edges"] is None and row["histogram_counts"] is None
        assert row["top_captions"] is None
        assert row["naming"] == "activations"
        if row["firing_count"] == 0:
            assert row["name"] is None and row["confidence"] is None


def test_duckdb_query_on_the_catalog_file(labelled_world):
    _, summary = labelled_world
    query = (
        "SELECT latent, name, confidence, top_source_ids[1] AS top_image FROM '{}' "
        "WHERE confidence > 0.5 ORDER BY confidence DESC, latent LIMIT 10"
    )
    rows = duckdb.sql(query.format(summary.catalog)).fetchall()
    named = [row for row in read_catalog(summary.catalog).to_pylist() if (row["confidence"] or 0) > 0.5]
    named.sort(key=lambda row: (-row["confidence"], row["latent"]))
    assert len(rows) == min(10, len(named)) > 0
    assert rows == [
        (row["latent"], row["name"], pytest.approx(row["confidence"]), row["top_source_ids"][0])
        for row in named[:10]
    ]


@torch.no_grad()
def test_vl_sae_top_captions_and_names_from_images_and_captions_on_s3(s3_root, ray_cluster, write_dataset):
    """A VL-SAE on the world CLIP's image and caption embeddings, labelled from S3: its top captions
    are the captions of the single-process exact top-k of the text rows, and its names come from
    its activation pattern over the images and the captions together."""
    n, source = 192, {"kind": "world", "n_items": 192, "seed": 3}
    items = generate_items(n, seed=3)
    model, preprocess, tokenizer = load_world_clip()
    images_nd = model.encode_image(torch.stack([preprocess(item.image) for item in items]))
    texts_nd = model.encode_text(tokenizer([item.caption for item in items]))
    ids = [item.id for item in items]
    sae = build_sae({"architecture": "vl_sae", "d_in": images_nd.shape[1], "n_latents": 96, "k": 4})
    torch.manual_seed(0)
    sae.init_from_data(torch.cat([images_nd, texts_nd]), torch.arange(2 * n) >= n)
    sae.save(f"{s3_root}/sae")
    images = write_dataset(f"{s3_root}/images", images_nd, ids, [100, 92], source)
    config = LabelConfig(
        sae=f"{s3_root}/sae",
        activations=images,
        embeddings=images,  # a VL-SAE's image rows are the image embeddings
        text_activations=write_dataset(f"{s3_root}/texts", texts_nd, ids, [100, 92], source),
        vocabulary="world",
        top_k=5,
        output=f"{s3_root}/labels",
    )
    summary = run_label(config)
    catalog = read_catalog(summary.catalog)
    vl_sae = SparseAutoencoder.load(config.sae)
    z_text_nf = vl_sae.encode(texts_nd)
    expected = torch.sort(z_text_nf, dim=0, descending=True, stable=True)
    caption = {item.id: item.caption for item in items}
    for row in catalog.to_pylist():
        j = row["latent"]
        rows, values = expected.indices[:5, j].tolist(), expected.values[:5, j].tolist()
        assert row["top_captions"] == [caption[ids[i]] for i, v in zip(rows, values, strict=True) if v > 0]
        assert row["top_caption_activations"] == pytest.approx([v for v in values if v > 0], rel=1e-5)
    # the names by hand: one agreement over the image rows and the caption rows outside the held-out fold
    encoder = TextEncoder(builtin_backbone())
    vocabulary = load_vocabulary("world")
    concepts_vd = concept_embeddings(encoder, vocabulary, config.prompts)
    kept = torch.tensor([not in_heldout_fold(i, config.heldout_fraction) for i in ids])

    def names(modalities):
        z_nf = torch.cat([vl_sae.encode(x_nd)[kept] for x_nd in modalities])
        unit_nd = torch.nn.functional.normalize(torch.cat([x_nd[kept] for x_nd in modalities]), dim=-1)
        p_nv = zero_shot_log_probability(unit_nd, concepts_vd, encoder.logit_scale, vocabulary.block_v).exp()
        share_fv, base_v = (z_nf.T @ p_nv) / z_nf.sum(0)[:, None], p_nv.mean(0)  # dense, all rows at once
        agreement_fv = torch.where(z_nf.sum(0)[:, None] > 0, (share_fv - base_v) / (1 - base_v), float("nan"))
        return specific_names(agreement_fv, base_v, vocabulary).name

    both, images_only = names([images_nd, texts_nd]), names([images_nd])
    named = [row for row in catalog.to_pylist() if row["name"] is not None]
    assert summary.naming == "activations" and len(named) >= 10
    assert all(row["name"] == both[row["latent"]] for row in named)
    assert sum(both[row["latent"]] != images_only[row["latent"]] for row in named) >= 1  # captions count
    # DuckDB queries the catalog read through `storage` (any URI) by its Python name
    first = duckdb.sql("SELECT latent, top_captions[1] FROM catalog WHERE len(top_captions) > 0 ORDER BY 1")
    rows = [(row["latent"], row["top_captions"][0]) for row in catalog.to_pylist() if row["top_captions"]]
    assert first.fetchall() == rows and rows
    # naming by the vision decoder needs no embeddings
    by_decoder = run_label(config.model_copy(update={"naming": "decoder", "output": f"{s3_root}/decoder"}))
    assert by_decoder.naming == "decoder" and 0 < by_decoder.latents_named == by_decoder.latents_with_examples


def test_text_activations_need_a_vl_sae(world_sae, tmp_path):
    _, _, _, _, sae = world_sae
    sae.save(str(tmp_path / "sae"))
    config = LabelConfig(
        sae=str(tmp_path / "sae"), activations="a", text_activations="t", output=str(tmp_path / "out")
    )
    with pytest.raises(ValueError, match="text_activations is for a VL-SAE, but .* is a 'topk' SAE"):
        run_label(config)
