"""VL-SAEs through `vlsae train`: on the world CLIP's paired image and caption datasets (extracted
to the S3 server) a sweep learns both sides on Ray Train and, through a killed worker, ends equal
to `fit_local` on the same batches; bad datasets are refused before launch."""

import concurrent.futures
import logging
import uuid

import pytest
import torch

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.extract import run_extract
from vlsae_ray.backbones import builtin_backbone
from vlsae_ray.config import ConfigError, ExtractConfig, TrainConfig, parse_config
from vlsae_ray.eval import fvu
from vlsae_ray.sae import SparseAutoencoder, build_sae
from vlsae_ray.train import fit_local
from vlsae_ray.train.ray_train import run_train

pytestmark = pytest.mark.slow


ITEMS, SHARD_ROWS, D = 512, 64, 64  # the world CLIP's embeddings are 64-wide
VL_SAE = {"architecture": "vl_sae", "d_in": D, "n_latents": 128, "k": 8}
# The default rate assumes unit-norm decoder columns; a VL-SAE's carry the scale and diverge at it.
VL_TRAINING = {"batch_size": 32, "epochs": 2, "lr": 5e-3}
TEXT_FVU = 0.5  # trained on both sides: 0.24 (k=8), 0.39 (k=4); on the image side alone: 0.9


@pytest.fixture(scope="module")
def world_pair(ray_cluster, s3_server):
    """(image dataset, caption dataset): hook points `visual` and `text` of the world CLIP over the
    same world items, extracted in one job to the S3 server."""
    config = ExtractConfig(
        source={"n_items": ITEMS, "seed": 5},
        backbone=builtin_backbone(),
        hook_points=["visual", "text"],
        output=f"s3://vlsae-test/{uuid.uuid4().hex[:12]}/acts",
        shard_rows=SHARD_ROWS,
        dtype="float32",
    )
    datasets = run_extract(config).datasets
    return datasets["visual"], datasets["text"]


def vl_config(images, texts, output, **training) -> TrainConfig:
    """A sweep of two VL-SAEs on 2 data-parallel workers."""
    return TrainConfig.model_validate(
        {
            "activations": images,
            "text_activations": texts,
            "sae": VL_SAE,
            "sweep": [{}, {"k": 4}],
            "training": {**VL_TRAINING, "num_workers": 2, **training},
            "output": output,
        }
    )


def text_fvu(sae: SparseAutoencoder, texts: str) -> float:
    x_nd, _ = store.load_activations(texts)
    with torch.no_grad():
        return fvu(x_nd, sae(x_nd, modality_b=torch.ones(len(x_nd), dtype=torch.bool))[0])


def test_vl_sae_sweep_learns_both_sides_survives_a_killed_worker_and_equals_fit_local(
    world_pair, ray_cluster, tmp_path, assert_same_sae, wait_for, kill_a_worker
):
    """A worker killed after a checkpoint; the run resumes to the weights of the uninterrupted run
    that `fit_local` makes in one process from the same batches."""
    images, texts = world_pair
    config = vl_config(images, texts, str(tmp_path / "sae"), checkpoint_every=4, max_failures=1)
    latest = storage.join(config.output, "checkpoints", "latest.json")  # the job's commit record
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_train, config)
        wait_for(lambda: storage.exists(latest), run.done)
        kill_a_worker(ray_cluster)
        assert not run.done()
        summary = run.result(timeout=300)
    assert summary.steps == VL_TRAINING["epochs"] * ITEMS // VL_TRAINING["batch_size"]
    for i, (output, sae_config) in enumerate(config.sae_runs()):
        # each side's FVU (on rank 0's last batch) is reported beside the FVU of both
        assert 0 < summary.metrics[f"sweep-{i:02d}/fvu_vision"] < 2 * TEXT_FVU
        assert 0 < summary.metrics[f"sweep-{i:02d}/fvu_text"] < 2 * TEXT_FVU
        trained = SparseAutoencoder.load(output)
        assert text_fvu(trained, texts) < TEXT_FVU

        # One process on both data-parallel parts' batches of each step as one batch.
        torch.manual_seed(config.training.seed)
        reference = build_sae(sae_config)
        metrics = fit_local(reference, images, text_activations=texts, parts=2, seed=0, **VL_TRAINING)
        assert metrics["steps"] == summary.steps and metrics["samples"] == summary.samples
        reference.save(str(tmp_path / f"reference-{i}"))
        assert_same_sae(SparseAutoencoder.load(str(tmp_path / f"reference-{i}")), trained)

    # The same VL-SAE trained on the image side alone leaves its text decoder untrained.
    torch.manual_seed(config.training.seed)
    vision_only = build_sae(VL_SAE)
    fit_local(vision_only, images, parts=2, seed=0, **VL_TRAINING)
    assert text_fvu(vision_only, texts) > TEXT_FVU


def write_dataset(uri: str, rows: list[int], items: int, d: int = D, listing: str = "") -> str:
    """A dataset of 8-item shards, shard i holding rows[i] rows, whose manifest lists `items` items."""
    manifest = store.Manifest(
        d=d,
        dtype="float32",
        model="m",
        hook_point="h",
        token="cls",
        shard_rows=8,
        items=items,
        listing=listing,
    )
    records = [
        store.write_shard(uri, i, torch.randn(n, d), [f"{i}/{r}" for r in range(n)], torch.zeros(n))
        for i, n in enumerate(rows)
    ]
    store.commit(uri, manifest, records)
    return uri


def test_bad_vl_training_data_is_refused_before_launch(tmp_path, caplog):
    images = write_dataset(str(tmp_path / "images"), [8, 8, 4], items=20)

    def config(texts, **update):
        raw = {"activations": images, "text_activations": texts, "sae": VL_SAE, "output": str(tmp_path)}
        return parse_config(raw | update, TrainConfig)

    topk = {"architecture": "topk", "d_in": D, "n_latents": 128, "k": 8}
    with pytest.raises(
        ConfigError, match="text_activations is for a VL-SAE, but sae has architecture 'topk'"
    ):
        config("texts", sae=topk)
    with pytest.raises(ConfigError, match=r"but sweep\[1\] has architecture 'topk'"):
        config("texts", sweep=[{}, {"architecture": "topk"}])
    refusals = [  # the text side's rows per shard, items and options; what the refusal says
        ([8, 8, 4], 20, {"d": 32}, "the text_activations at .* have d=32; a VL-SAE encodes both sides"),
        ([8, 8, 8], 24, {}, "hold 20 and 24 items, in shards of 8 and 8 items"),
        ([8, 8, 4], 20, {"listing": "other"}, "list other item ids"),
        ([8, 8], 20, {}, r"other committed shards \(\[2\] only on the image side"),
        # two rows per item (e.g. token random with k=2) where the image side has one
        ([16, 16, 8], 20, {}, "shard 0 holds 8 image rows and 16 text rows for its 8 items: paired"),
    ]
    for i, (rows, items, options, message) in enumerate(refusals):
        texts = write_dataset(str(tmp_path / f"texts-{i}"), rows, items, **options)
        with pytest.raises(ValueError, match=message):
            run_train(config(texts))
    # unpaired sides need no common items (this one then has too few rows for a batch of 1024)
    with pytest.raises(ValueError, match="too few rows for one batch of 1024"):
        run_train(config(str(tmp_path / "texts-1"), paired=False))
    # a vl_sae without a text side says that it learns one side
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="too few rows"):
        run_train(config(None))
    assert "a vl_sae without text_activations learns the image side only" in caplog.text
