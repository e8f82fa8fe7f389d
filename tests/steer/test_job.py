"""The steer job on a local Ray: concept latents of a catalog clamped inside the world CLIP, flip and
hold rates recomputed by hand from the pairs it writes, unsteered predictions against a direct
zero-shot, steerability written into the catalog, and bad settings failing before any work.

The meaning check: an SAE trained here on block-2 activations (4 random tokens per image) has
colour and shape latents; clamped on all tokens at 8x their maximum, they flip the world CLIP's
zero-shot colour or shape prediction on held-out images lacking the value. The steering recipe's
run (README) measured flip rates of 0.76 (colour, 10 latents) and 1.0 (shape) at 8x; this smaller
SAE's few colour latents flip less and vary more (0.31 +- 0.31 at 4x). We require the mean over
latents to reach 2.5 times the chance rate (1/7 for colour, 1/6 for shape) at 8x, and more than at 1x.
"""

import io
import json

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlsae_ray import storage
from vlsae_ray.activations.sources import world_labels
from vlsae_ray.backbones import builtin_backbone
from vlsae_ray.config import BackboneConfig, SteerConfig
from vlsae_ray.interpret.catalog import SCHEMA, read_catalog, write_catalog
from vlsae_ray.sae import build_sae
from vlsae_ray.steer.job import run_steer
from vlsae_ray.steer.measure import probe_image, steering_score, summarize
from vlsae_ray.train import fit_local
from vlsae_ray.world import ATTRIBUTES, generate_item, generate_items, load_world_clip, zero_shot_accuracy
from vlsae_ray.world.llava import VISION_FEATURE_HOOK, WORLD_LLAVA_PATH

BLOCK = "visual.transformer.resblocks.2"
TOP = 16


@pytest.fixture(scope="module")
def steering_run(tmp_path_factory, ray_cluster):
    """A block-2 SAE, its catalog (top images by a latent's largest token activation, as the label
    job ranks token rows), and one steer job run over it."""
    root = str(tmp_path_factory.mktemp("steer"))
    model, preprocess, _ = load_world_clip()
    items = generate_items(1536, seed=2)
    acts = []
    handle = model.get_submodule(BLOCK).register_forward_hook(lambda _m, _i, out: acts.append(out))
    with torch.no_grad():
        for start in range(0, len(items), 512):
            model.encode_image(torch.stack([preprocess(it.image) for it in items[start : start + 512]]))
    handle.remove()
    x_btd = torch.cat(acts)
    tokens = torch.randint(0, x_btd.shape[1], (len(x_btd), 4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    sae = build_sae({"architecture": "topk", "d_in": 96, "n_latents": 768, "k": 16})
    rows_nd = x_btd[torch.arange(len(x_btd))[:, None], tokens].reshape(-1, 96)
    fit_local(sae, rows_nd, batch_size=256, epochs=6, seed=0)
    sae.save(f"{root}/sae")
    with torch.no_grad():
        max_if = torch.stack([sae.encode(x_td).amax(0) for x_td in x_btd])  # per image, its largest token
    values_kf, rows_kf = max_if.topk(TOP, dim=0)
    n = sae.config.n_latents
    columns = {name: [None] * n for name in SCHEMA.names}
    columns |= {
        "sae": [f"{root}/sae"] * n,
        "sae_sha256": ["0" * 64] * n,
        "latent": list(range(n)),
        "firing_count": (max_if > 0).sum(0).tolist(),
        "top_source_ids": [
            [items[i].id for i, v in zip(rows_kf[:, j], values_kf[:, j], strict=True) if v > 0]
            for j in range(n)
        ],
        "top_activations": [[float(v) for v in values_kf[:, j] if v > 0] for j in range(n)],
    }
    write_catalog(f"{root}/catalog.parquet", columns, {})
    config = SteerConfig(
        sae=f"{root}/sae",
        catalog=f"{root}/catalog.parquet",
        backbone=builtin_backbone(),
        hook_point=BLOCK,
        modes=["delta"],
        strengths=[1.0, 8.0],
        n_images=8,
        max_latents=14,
        batch_size=32,
        output=f"{root}/steering",
    )
    return config, run_steer(config)


def _pairs(config):
    return pq.read_table(
        io.BytesIO(storage.read_bytes(storage.join(config.output, "pairs.parquet")))
    ).to_pylist()


def test_flip_and_hold_rates_match_a_count_by_hand(steering_run):
    config, summary = steering_run
    steering = json.loads(storage.read_text(summary.steering))
    rows = _pairs(config)
    before = {(r["latent"], r["item"]): json.loads(r["predicted"]) for r in rows if r["mode"] == "none"}
    known = steering["known_attributes"]
    for attribute, by_mode in steering["curves"].items():
        for point in by_mode["delta"]:
            flips, holds = {}, {}
            for r in rows:
                if r["attribute"] != attribute or r["mode"] != "delta" or r["strength"] != point["strength"]:
                    continue
                after = json.loads(r["predicted"])
                flips.setdefault(r["latent"], []).append(after[attribute] == r["value"])
                others = [a for a in known if a != attribute]
                same = [after[a] == before[(r["latent"], r["item"])][a] for a in others]
                holds.setdefault(r["latent"], []).append(sum(same) / len(same))
            flip = torch.tensor([sum(v) / len(v) for v in flips.values()], dtype=torch.float64)
            hold = torch.tensor([sum(v) / len(v) for v in holds.values()], dtype=torch.float64)
            assert point["latents"] == len(flips)
            assert point["flip"][0] == pytest.approx(float(flip.mean()))
            assert point["flip"][1] == pytest.approx(float(flip.std(unbiased=False)))
            assert point["hold_known"][0] == pytest.approx(float(hold.mean()))
    # every flip image lacks the latent's value, so a flip is a change the clamp made
    for r in rows:
        if r["kind"] == "flip":
            assert world_labels(r["item"])[r["attribute"]] != r["value"]


def test_unsteered_predictions_are_the_world_clips_zero_shot(steering_run):
    config, _ = steering_run
    rows = [r for r in _pairs(config) if r["mode"] == "none"]
    items = [generate_item(int(r["item"].rsplit("-", 1)[1]), split="test", seed=0) for r in rows[:40]]
    assert [it.id for it in items] == [r["item"] for r in rows[:40]]
    model, preprocess, tokenizer = load_world_clip()
    accuracy = zero_shot_accuracy(model, preprocess, tokenizer, items)
    for attribute in ATTRIBUTES:
        predicted = [json.loads(r["predicted"])[attribute] for r in rows[:40]]
        right = [p == it.labels[attribute] for p, it in zip(predicted, items, strict=True)]
        assert sum(right) / len(right) == pytest.approx(accuracy[attribute])


def test_colour_and_shape_latents_steer_well_above_chance(steering_run):
    config, summary = steering_run
    steering = json.loads(storage.read_text(summary.steering))
    measured = [a for a in ("colour", "shape") if a in steering["curves"]]
    assert measured, f"no colour or shape concept latent among {list(steering['curves'])}"
    for attribute in measured:
        strong = next(p for p in steering["curves"][attribute]["delta"] if p["strength"] == 8.0)
        chance = 1 / len(ATTRIBUTES[attribute])
        assert strong["flip"][0] >= 2.5 * chance, (attribute, strong)
        weak = next(p for p in steering["curves"][attribute]["delta"] if p["strength"] == 1.0)
        assert strong["flip"][0] > weak["flip"][0]  # a stronger clamp flips more
    assert set(summary.goals) == {f"{a}/delta" for a in measured}


def test_steerability_is_written_into_the_catalog_and_the_report_has_its_figures(steering_run):
    config, summary = steering_run
    steering = json.loads(storage.read_text(summary.steering))
    catalog = read_catalog(config.catalog).to_pylist()
    measured = {int(j): v for j, v in steering["steerability"].items()}
    assert len(measured) == 14
    for row in catalog:
        if row["latent"] in measured:
            assert row["steerability"] == pytest.approx(measured[row["latent"]], abs=1e-6)
        else:
            assert row["steerability"] is None
    assert catalog[0]["top_source_ids"] is not None  # the rest of the catalog is kept
    report = storage.read_text(summary.report)
    assert "| colour | delta |" in report or "| shape | delta |" in report
    for name in ("flip_vs_strength.png", "examples.png"):
        image = Image.open(io.BytesIO(storage.read_bytes(storage.join(config.output, name))))
        assert image.size[0] > 300 and image.size[1] > 200


def test_summary_counts_on_hand_made_rows():
    items = [generate_item(i, split="test", seed=0) for i in range(2)]
    truth = [it.labels for it in items]
    value = next(c for c in ATTRIBUTES["colour"] if c not in {t["colour"] for t in truth})

    def row(item, mode, strength, predicted):
        return {
            **{"latent": 7, "attribute": "colour", "value": value, "item": item, "kind": "flip"},
            **{"mode": mode, "strength": strength, "predicted": json.dumps(predicted)},
        }

    rows = [
        row(items[0].id, "none", 0.0, truth[0]),
        row(items[1].id, "none", 0.0, truth[1]),
        row(items[0].id, "delta", 2.0, truth[0] | {"colour": value, "size": "other"}),
        row(items[1].id, "delta", 2.0, truth[1]),
    ]
    summary = summarize(rows)
    point = summary["curves"]["colour"]["delta"][0]
    assert point["flip"][0] == 0.5  # one of the two images turned red
    assert summary["unsteered_accuracy"]["colour"] == 1.0
    others = [a for a in summary["known_attributes"] if a != "colour"]
    assert point["hold_known"][0] == pytest.approx((1 - 1 / len(others) + 1) / 2)  # size moved on one image
    assert summary["steerability"][7] == pytest.approx(point["flip"][0] * point["hold_known"][0])


def test_bad_steering_configs_fail_before_any_work(steering_run, tmp_path):
    config, _ = steering_run
    with pytest.raises(ValueError, match="is not a module"):
        run_steer(config.model_copy(update={"hook_point": "visual.blocks.9", "output": str(tmp_path / "a")}))
    empty = {name: [None] for name in SCHEMA.names} | {"latent": [0], "sae": ["x"], "sae_sha256": ["0"]}
    write_catalog(str(tmp_path / "empty.parquet"), empty, {})
    with pytest.raises(ValueError, match="no concept latents"):
        empty_config = {"catalog": str(tmp_path / "empty.parquet"), "output": str(tmp_path / "b")}
        run_steer(config.model_copy(update=empty_config))
    with pytest.raises(ValueError, match="positive multiples"):
        SteerConfig(**{**config.model_dump(), "strengths": [0.0, 1.0]})


def test_the_job_steers_the_world_llava_and_scores_its_one_word_answers(steering_run, tmp_path):
    """The same SAE (block 2 of the world CLIP) in the world LLaVA's vision tower, where its projector
    reads: every pair gets an answer per attribute and a one-word answer, and the steering score
    covers both of Pach et al.'s protocols."""
    config, _ = steering_run
    llava = config.model_copy(
        update={
            "backbone": BackboneConfig(library="llava", model=str(WORLD_LLAVA_PATH)),
            "hook_point": VISION_FEATURE_HOOK,
            "max_latents": 2,
            "n_images": 3,
            "strengths": [1.0],
            "output": str(tmp_path / "llava"),
        }
    )
    summary = run_steer(llava)
    rows = _pairs(llava)
    probes = [r for r in rows if r["kind"] == "probe"]
    assert len(probes) == 2 * 2 * (len(ATTRIBUTES["shape"]) + 1)  # 2 latents x 2 settings x probe images
    unsteered = [json.loads(r["predicted"]) for r in rows if r["mode"] == "none" and r["kind"] == "flip"]
    items = [world_labels(r["item"]) for r in rows if r["mode"] == "none" and r["kind"] == "flip"]
    # the world LLaVA answers colour questions about held-out images right (0.976 on 500 images)
    assert sum(p["colour"] == t["colour"] for p, t in zip(unsteered, items, strict=True)) >= len(items) - 1
    score = json.loads(storage.read_text(summary.steering))["steering_score"]
    assert {"none/class_images", "none/white_image", "delta/1/class_images", "delta/1/white_image"} <= set(
        score
    )
    assert score["none/white_image"]["pairs"] == 2


@torch.no_grad()
def test_steering_score_against_a_direct_computation():
    model, preprocess, tokenizer = load_world_clip()
    top = {
        3: [generate_item(i, seed=4).id for i in range(3)],
        9: [generate_item(i, seed=4).id for i in (5, 6)],
    }
    probes = {"delta/2": {3: {"white": "red", "x": "circle"}, 9: {"white": "blue"}}}
    scores = steering_score(probes, top, model, preprocess, tokenizer, seed=0)

    def mean_image(ids):
        return torch.stack([model.encode_image(preprocess(probe_image(i))[None])[0] for i in ids]).mean(0)

    def cos(word, ids):
        return float(torch.cosine_similarity(model.encode_text(tokenizer([word]))[0], mean_image(ids), dim=0))

    white = [cos("red", top[3]), cos("blue", top[9])]
    assert scores["delta/2/white_image"]["score"][0] == pytest.approx(sum(white) / 2, abs=1e-5)
    assert scores["delta/2/white_image"]["score"][1] == pytest.approx(abs(white[0] - white[1]) / 2, abs=1e-5)
    assert scores["delta/2/class_images"]["score"][0] == pytest.approx(cos("circle", top[3]), abs=1e-5)
    # with two latents a shuffle either keeps or swaps them; the baseline uses the other's images
    shuffled = scores["delta/2/white_image"]["shuffled"][0]
    swapped = (cos("red", top[9]) + cos("blue", top[3])) / 2
    assert shuffled == pytest.approx(sum(white) / 2, abs=1e-5) or shuffled == pytest.approx(swapped, abs=1e-5)
