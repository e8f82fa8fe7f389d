"""The evaluate job on the concept world: real world CLIP, real Ray, report on the S3 server."""

import io

import pytest
import torch
from PIL import Image

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.backbones import builtin_backbone
from vlsae_ray.config import EvaluateConfig, ZeroShotConfig
from vlsae_ray.eval import monosemanticity_score, plots
from vlsae_ray.eval.downstream import zero_shot_with_sae
from vlsae_ray.eval.evaluate import run_evaluate
from vlsae_ray.eval.uniqueness import top_set_overlap
from vlsae_ray.sae import SparseAutoencoder, build_sae
from vlsae_ray.train import fit_local
from vlsae_ray.world import generate_items, load_world_clip, zero_shot_accuracy

BLOCK, N, TOP = "visual.transformer.resblocks.2", 384, 6


@pytest.fixture(scope="module")
def world():
    """Block-2 CLS activations, image and caption embeddings of N world items, and trained SAEs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, preprocess, tokenizer = load_world_clip()
        items = generate_items(N, seed=1)
        captured = {}
        handle = model.get_submodule(BLOCK).register_forward_hook(
            lambda _m, _i, output: captured.update(x=output[:, 0])
        )
        with torch.no_grad():
            images = model.encode_image(torch.stack([preprocess(item.image) for item in items]))
            texts = model.encode_text(tokenizer([item.caption for item in items]))
        handle.remove()
        x_nd = captured["x"]
        saes = {}
        for name, config in (
            ("matryoshka", {"architecture": "matryoshka_batchtopk", "n_latents": 384, "k": 8,
                            "group_fractions": [0.25, 0.25, 0.5]}),
            ("topk", {"architecture": "topk", "n_latents": 192, "k": 4}),
        ):  # fmt: skip
            torch.manual_seed(0)
            saes[name] = build_sae({"d_in": x_nd.shape[1], **config})
            fit_local(saes[name], x_nd, batch_size=64, epochs=4, seed=0)
        torch.manual_seed(0)
        vl = build_sae({"architecture": "vl_sae", "d_in": images.shape[1], "n_latents": 128, "k": 4})
        both = torch.cat([images, texts])
        fit_local(vl, both, batch_size=64, epochs=4, seed=0, modality=torch.arange(2 * N) >= N)
    finally:
        torch.set_num_threads(threads)
    return [item.id for item in items], x_nd, images, texts, {**saes, "vl": vl.eval()}


def write(uri, x_nd, ids, hook_point):
    manifest = store.Manifest(
        d=x_nd.shape[1], dtype="float32", model="world-clip", hook_point=hook_point, token="cls",
        shard_rows=128, items=len(ids), listing=store.listing_digest(ids),
    )  # fmt: skip
    records = [
        store.write_shard(
            uri, i, x_nd[s : s + 128], ids[s : s + 128], torch.zeros(len(ids[s : s + 128]), dtype=torch.int32)
        )
        for i, s in enumerate(range(0, len(ids), 128))
    ]
    store.commit(uri, manifest, records)
    return uri


def png_size(uri: str) -> tuple[int, int]:
    image = Image.open(io.BytesIO(storage.read_bytes(uri)))
    image.load()  # decodes the whole image: fails on a truncated or corrupt PNG
    return image.size


@pytest.mark.slow
def test_evaluate_writes_the_report_with_plots_to_s3(ray_cluster, s3_root, world):
    ids, x_nd, images, _, saes = world
    acts = write(storage.join(s3_root, "acts"), x_nd, ids, BLOCK)
    emb = write(storage.join(s3_root, "emb"), images, ids, "visual")
    for name in ("matryoshka", "topk"):
        saes[name].save(storage.join(s3_root, name))
    config = EvaluateConfig(
        sae=storage.join(s3_root, "matryoshka"),
        checkpoints=[storage.join(s3_root, "topk")],
        activations=acts,
        embeddings=emb,
        top_k=TOP,
        grid_latents=4,
        shards_per_task=1,
        zero_shot=ZeroShotConfig(backbone=builtin_backbone(), n_items=100, attributes=["colour"]),
        output=storage.join(s3_root, "report"),
    )
    summary = run_evaluate(config)

    sae = saes["matryoshka"].eval()
    with torch.no_grad():
        z = sae.encode(x_nd)
    ms = monosemanticity_score(z, images)
    assert summary.ms_latents_median == pytest.approx(float(ms.nanmedian()), abs=1e-5)
    top = [[int(i) for i in torch.sort(z[:, j], descending=True, stable=True).indices[:TOP] if z[i, j] > 0]
           for j in range(z.shape[1])]  # fmt: skip
    assert summary.uniqueness == pytest.approx(top_set_overlap(top)["uniqueness"])
    assert [c.sae for c in summary.checkpoints] == [config.sae, *config.checkpoints]
    assert len(summary.prefix_fvu) == 3 and summary.prefix_fvu[-1] == pytest.approx(summary.fvu)
    assert set(summary.zero_shot) == {"without", "with_sae"}
    assert "concept-level zero-shot not run: it needs a VL-SAE" in " ".join(summary.notes)
    assert (
        set(summary.zero_shot["with_sae"]) == set(summary.zero_shot["without"])
        and summary.zero_shot["without"]
    )

    report = storage.read_text(storage.join(config.output, "report.md"))
    expected = {
        "ms_histogram": plots.figure_pixels(plots.PLOT_SIZE),
        "fvu_vs_l0": plots.figure_pixels(plots.PLOT_SIZE),
        "matryoshka_groups": plots.figure_pixels(plots.PLOT_SIZE),
        "top_images": plots.figure_pixels(plots.grid_size(4, TOP)),
    }
    assert set(summary.plots) == set(expected)
    for name, size in expected.items():
        uri = storage.join(config.output, f"{name}.png")
        assert summary.plots[name] == uri and png_size(uri) == size
        assert f"]({name}.png)" in report
    assert "| with SAE |" in report and "zero-shot skipped" not in report


@pytest.mark.slow
def test_vlsae_concept_similarity_and_skipped_parts(ray_cluster, tmp_path, world):
    ids, _, images, texts, saes = world
    root = str(tmp_path)
    saes["vl"].save(storage.join(root, "vl"))
    config = EvaluateConfig(
        sae=storage.join(root, "vl"),
        activations=write(storage.join(root, "img"), images, ids, "visual"),
        text_activations=write(storage.join(root, "txt"), texts, ids, "text"),
        top_k=TOP,
        output=storage.join(root, "report"),
    )
    summary = run_evaluate(config)
    similarity = summary.concept_similarity
    assert similarity["concepts"] > 10
    # a latent's top rows are the rows nearest its encoder direction: alike within, apart across
    assert similarity["intra_image"] > similarity["inter_image"]
    assert similarity["intra_text"] > similarity["inter_text"]
    assert summary.ms_latents_median is None and summary.zero_shot is None
    notes = " ".join(summary.notes)
    assert "no `embeddings`" in notes and "no `zero_shot`" in notes
    assert "## Notes" in storage.read_text(summary.report)


@pytest.mark.slow
def test_evaluate_reports_concept_level_zero_shot_for_a_vlsae_on_the_image_embedding(
    ray_cluster, tmp_path, world
):
    ids, _, images, texts, saes = world
    root = str(tmp_path)
    saes["vl"].save(storage.join(root, "vl"))
    zero_shot = ZeroShotConfig(
        backbone=builtin_backbone(), n_items=80, validation_items=40, attributes=["shape", "colour"]
    )
    config = EvaluateConfig(
        sae=storage.join(root, "vl"),
        activations=write(storage.join(root, "img"), images, ids, "visual"),
        text_activations=write(storage.join(root, "txt"), texts, ids, "text"),
        zero_shot=zero_shot,
        top_k=TOP,
        output=storage.join(root, "report"),
    )
    summary = run_evaluate(config)
    expected = zero_shot_with_sae(zero_shot, "visual", SparseAutoencoder.load(config.sae), "cls")
    assert set(expected) == {"without", "with_sae", "enhanced", "alpha"} and summary.zero_shot == expected
    assert not any("concept-level" in note for note in summary.notes)
    report = storage.read_text(summary.report)
    assert "| task | without | with SAE | concept-level (alpha) |" in report
    shape = {key: values["shape"] for key, values in expected.items()}
    assert f"| shape | {shape['without']:.3f} | {shape['with_sae']:.3f} | {shape['enhanced']:.3f} " in report
    assert f" ({shape['alpha']:g}) |" in report


def test_zero_shot_with_the_sae_spliced_in_is_reported_next_to_the_plain_model(world):
    _, _, _, _, saes = world
    config = ZeroShotConfig(backbone=builtin_backbone(), n_items=150, attributes=["shape", "colour", "count"])
    model, preprocess, tokenizer = load_world_clip()
    items = generate_items(config.n_items, split=config.split, seed=config.seed)
    plain = zero_shot_accuracy(model, preprocess, tokenizer, items, config.attributes)
    spliced = zero_shot_with_sae(config, BLOCK, saes["topk"], "cls")
    assert spliced["without"] == plain and set(spliced) == {"without", "with_sae"}  # no VL-SAE: no alpha
    assert all(0.0 <= acc <= 1.0 for acc in spliced["with_sae"].values())
    # the reconstruction is not the activation, so the spliced model's predictions differ somewhere
    assert spliced["with_sae"] != spliced["without"]
