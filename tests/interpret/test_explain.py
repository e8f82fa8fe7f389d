"""Explaining an image-caption pair: a real VL-SAE on the world CLIP's embeddings, checked against a
direct computation of both encodings."""

import pytest

from vlsae_ray.interpret.catalog import SCHEMA, read_catalog, write_catalog
from vlsae_ray.interpret.explain import PairConcept, catalog_names, explain_pair

pytestmark = pytest.mark.usefixtures("one_thread")
N = 256


@pytest.fixture(scope="module")
def pairs(world_vl_sae):
    """(image embeddings, caption embeddings) of N world items, and a VL-SAE trained on both."""
    return world_vl_sae(N, seed=3, n_latents=128, k=8, batch_size=64)


def test_pair_explanation_matches_both_encodings(pairs, tmp_path):
    images, texts, sae = pairs
    uri = str(tmp_path / "catalog.parquet")
    active = (sae.encode(images[:1])[0] > 0).nonzero().flatten().tolist()
    named = {active[0]: ("red", 0.75), active[1]: (None, None), active[2]: ("circle", 0.5)}
    columns = {field.name: [None] * len(named) for field in SCHEMA}
    columns |= {
        "latent": list(named),
        "name": [name for name, _ in named.values()],
        "confidence": [confidence for _, confidence in named.values()],
    }
    write_catalog(uri, columns, {})
    names = catalog_names(read_catalog(uri))
    assert names == {j: {"name": name, "confidence": confidence} for j, (name, confidence) in named.items()}

    seen = set()
    for i in range(8):
        explanation = explain_pair(sae, images[i], texts[i], names=names, top_k=1000)
        z_image, z_text = sae.encode(images[i : i + 1])[0], sae.encode(texts[i : i + 1])[0]
        expected = {"shared": [], "image_only": [], "text_only": []}
        for j in range(sae.config.n_latents):
            a, b = float(z_image[j]), float(z_text[j])
            side = "shared" if a > 0 and b > 0 else "image_only" if a > 0 else "text_only" if b > 0 else None
            if side:
                name, confidence = named.get(j, (None, None))
                expected[side].append(PairConcept(j, name, confidence, a, b))
        for side, concepts in expected.items():
            got = getattr(explanation, side)
            assert sorted(got, key=lambda c: c.latent) == concepts
            larger = [max(c.image_activation, c.text_activation) for c in got]
            assert larger == sorted(larger, reverse=True)
            seen.add((side, bool(got)))
        if i == 0:  # the catalog's names reach the concepts of image 0's latents
            on_image = [*explanation.shared, *explanation.image_only]
            assert {(c.name, c.confidence) for c in on_image} >= {("red", 0.75), ("circle", 0.5)}
        # every active latent lands in exactly one list: k per side, the shared ones counted twice
        assert len(explanation.shared) * 2 + len(explanation.image_only) + len(explanation.text_only) == 16
    # the trained VL-SAE puts a caption's concepts partly on its image's latents, partly not
    assert {("shared", True), ("image_only", True), ("text_only", True)} <= seen

    short = explain_pair(sae, images[0], texts[0], top_k=2)
    full = explain_pair(sae, images[0], texts[0], top_k=1000)
    assert short.shared == full.shared[:2] and all(c.name is None for c in full.shared)


def test_pair_explanation_rejects_a_batch(pairs):
    images, texts, sae = pairs
    with pytest.raises(ValueError, match=r"image_x_d has shape \(2, 64\); expected \[64\]"):
        explain_pair(sae, images[:2], texts[0])
