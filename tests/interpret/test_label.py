"""The label job end to end on a local Ray: names against the concept world's ground truth, the
catalog read back with DuckDB, and a VL-SAE's top captions on S3.

The meaning check: the SAE of `world_sae` (block-2 CLS activations of the world CLIP) is named by
its top images (`naming: top_images`, the default vocabulary). A name matches a latent when the
world concept it names is held by at least 8 of the latent's 9 top images (its top images often
share two or three concepts, e.g. "three large white objects", and any of them is a right name).
Among the quarter of live latents with the highest MS we measured 62% matching names on the
committed checkpoint (24 latents; binomial sd about 10 points; 68% on the previous checkpoint);
the chance rate, a uniformly random name of the 120-concept vocabulary matching, is about 2%. We
require at least 50% (names right for most latents, 25 times chance) and at least 10 times the
chance rate. The run is deterministic, so the margin guards against changes, not noise.
"""

import duckdb
import pytest
import torch

from vlsae_ray.activations.sources import world_labels
from vlsae_ray.config import LabelConfig
from vlsae_ray.eval import monosemanticity_score
from vlsae_ray.interpret import read_catalog, run_label
from vlsae_ray.interpret.naming import load_vocabulary
from vlsae_ray.sae import SparseAutoencoder, build_sae
from vlsae_ray.world import ATTRIBUTES, generate_items, load_world_clip

TOP = 9
# The default vocabulary's phrase for each world concept.
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
WORLD_NAMES = {
    **{("colour", c): f"{c} objects" for c in ATTRIBUTES["colour"]},
    **{("shape", s): "crosses" if s == "cross" else f"{s}s" for s in ATTRIBUTES["shape"]},
    **{("size", s): f"{s} objects" for s in ATTRIBUTES["size"]},
    **{("pattern", p): f"{p} objects" for p in ATTRIBUTES["pattern"]},
    **{("count", c): f"{c} object" if c == "one" else f"{c} objects" for c in ATTRIBUTES["count"]},
    **{("position", p): f"objects {POSITIONS.get(p, 'in the centre')}" for p in ATTRIBUTES["position"]},
    **{("background", b): f"a {'noisy' if b == 'noise' else b} background" for b in ATTRIBUTES["background"]},
}


def held_names(source_ids: list[str]) -> set[str]:
    """The vocabulary names of the world concepts that at least 8 of 9 of these items hold."""
    labels = [world_labels(source_id) for source_id in source_ids]
    return {
        name
        for (attribute, value), name in WORLD_NAMES.items()
        if sum(label[attribute] == value for label in labels) >= len(labels) - 1
    }


@pytest.fixture(scope="module")
def labelled_world(world_sae, tmp_path_factory, ray_cluster, write_dataset):
    ids, x_nd, _, embeddings_ne, sae = world_sae
    root = str(tmp_path_factory.mktemp("label"))
    shards = [512, 512, 300, 212, 512]
    sae.save(f"{root}/sae")
    config = LabelConfig(
        sae=f"{root}/sae",
        activations=write_dataset(f"{root}/block", x_nd, ids, shards),
        embeddings=write_dataset(f"{root}/embedding", embeddings_ne, ids, shards),
        top_k=TOP,
        output=f"{root}/labels",
    )
    return config, run_label(config)


def test_high_ms_latents_get_names_of_their_ground_truth_concept(world_sae, labelled_world):
    assert set(WORLD_NAMES.values()) <= set(load_vocabulary())
    _, _, z_nf, embeddings_ne, _ = world_sae
    config, summary = labelled_world
    catalog = read_catalog(summary.catalog).to_pylist()
    assert summary.naming == "top_images" and len(catalog) == z_nf.shape[1]
    ms_f = monosemanticity_score(z_nf, embeddings_ne)
    live = [row for row in catalog if len(row["top_source_ids"]) == TOP and not ms_f[row["latent"]].isnan()]
    high = sorted(live, key=lambda row: -ms_f[row["latent"]])[: len(live) // 4]
    assert len(high) >= 20, f"only {len(high)} high-MS latents to judge"
    matching = [row["name"] in held_names(row["top_source_ids"]) for row in high]
    rate = sum(matching) / len(high)
    vocabulary = len(load_vocabulary())
    chance = sum(len(held_names(row["top_source_ids"])) / vocabulary for row in high) / len(high)
    print(f"\nnames matching ground truth: {rate:.0%} of {len(high)} high-MS latents (chance {chance:.1%})")
    assert rate >= 0.5 and rate >= 10 * chance, (rate, chance)


def test_catalog_rows_are_the_exact_top_k_and_firing_counts(world_sae, labelled_world):
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
        assert row["top_captions"] is None
        assert (row["name"] is None) == (row["firing_count"] == 0)


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
def test_vl_sae_top_captions_and_decoder_names_on_s3(s3_root, ray_cluster, write_dataset):
    """A VL-SAE on the world CLIP's image and caption embeddings, labelled from S3: its top captions
    are the captions of the single-process exact top-k of the text rows."""
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
    config = LabelConfig(
        sae=f"{s3_root}/sae",
        activations=write_dataset(f"{s3_root}/images", images_nd, ids, [100, 92], source),
        text_activations=write_dataset(f"{s3_root}/texts", texts_nd, ids, [64, 64, 64], source),
        naming="decoder",
        top_k=5,
        output=f"{s3_root}/labels",
    )
    summary = run_label(config)
    catalog = read_catalog(summary.catalog)
    z_text_nf = SparseAutoencoder.load(config.sae).encode(texts_nd)
    expected = torch.sort(z_text_nf, dim=0, descending=True, stable=True)
    caption = {item.id: item.caption for item in items}
    for row in catalog.to_pylist():
        j = row["latent"]
        rows, values = expected.indices[:5, j].tolist(), expected.values[:5, j].tolist()
        assert row["top_captions"] == [caption[ids[i]] for i, v in zip(rows, values, strict=True) if v > 0]
        assert row["top_caption_activations"] == pytest.approx([v for v in values if v > 0], rel=1e-5)
        assert (row["name"] is None) == (row["firing_count"] == 0)
    assert summary.naming == "decoder" and 0 < summary.latents_named == summary.latents_with_examples
    # DuckDB queries the catalog read through `storage` (any URI) by its Python name
    first = duckdb.sql("SELECT latent, top_captions[1] FROM catalog WHERE len(top_captions) > 0 ORDER BY 1")
    rows = [(row["latent"], row["top_captions"][0]) for row in catalog.to_pylist() if row["top_captions"]]
    assert first.fetchall() == rows and rows


def test_text_activations_need_a_vl_sae(world_sae, tmp_path):
    _, _, _, _, sae = world_sae
    sae.save(str(tmp_path / "sae"))
    config = LabelConfig(
        sae=str(tmp_path / "sae"), activations="a", text_activations="t", output=str(tmp_path / "out")
    )
    with pytest.raises(ValueError, match="text_activations is for a VL-SAE, but .* is a 'topk' SAE"):
        run_label(config)
