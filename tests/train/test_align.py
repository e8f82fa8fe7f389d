"""The LLaVA aligner through `vlsae train`: one config trains it with Ray Train on paired datasets,
saves it, projects both datasets with it and trains the VL-SAE on the projections."""

import pytest
import torch

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.config import TrainConfig
from vlsae_ray.sae.aligner import Aligner
from vlsae_ray.train.align import run_align

pytestmark = pytest.mark.slow

N, D, D_PROJ = 256, 16, 8


def paired_datasets(root: str) -> tuple[str, str]:
    """Image rows v and caption rows t = v A + noise, 4 shards each: row i of one pairs row i of the other."""
    generator = torch.Generator().manual_seed(0)
    v_nd = torch.randn(N, D, generator=generator)
    t_nd = v_nd @ torch.randn(D, D, generator=generator) + 0.1 * torch.randn(N, D, generator=generator)
    images, texts = storage.join(root, "images"), storage.join(root, "texts")
    store.write_dataset(images, list(v_nd.chunk(4)), dtype="float32")
    store.write_dataset(texts, list(t_nd.chunk(4)), dtype="float32")
    return images, texts


def test_aligner_trains_on_ray_train_saves_reloads_and_projects_both_sides(ray_cluster, tmp_path):
    """`run_train` calls `run_align` first when the config has an `aligner:` section; the VL-SAE then
    trains on the config it returns like on any paired datasets (tests/train/test_vlsae_train.py)."""
    images, texts = paired_datasets(str(tmp_path / "data"))
    config = TrainConfig.model_validate(
        {
            "activations": images,
            "text_activations": texts,
            "aligner": {"d_proj": D_PROJ, "batch_size": 64, "epochs": 15, "lr": 1e-2},
            "sae": {"architecture": "vl_sae", "d_in": D_PROJ, "n_latents": 32, "k": 4},
            "training": {"num_workers": 2},
            "output": str(tmp_path / "vlsae"),
        }
    )
    sae_config, metrics = run_align(config)
    # 2 workers, each 2 shards of 64 pairs in batches of 32: 4 steps an epoch
    assert metrics["aligner/steps"] == 15 * 4
    assert metrics["aligner/retrieval"] > 0.5  # of 32 candidates each: chance is 1/32
    aligner = Aligner.load(storage.join(config.output, "aligner"))
    assert (aligner.config.d_in, aligner.config.d_proj) == (D, D_PROJ)
    assert sae_config.aligner is None and sae_config.sae == config.sae
    for side, dataset, source, modality in (
        ("image", sae_config.activations, images, "vision"),
        ("text", sae_config.text_activations, texts, "text"),
    ):
        assert dataset == storage.join(config.output, "aligned", side)
        projected, ids = store.load_activations(dataset)
        x_nd, source_ids = store.load_activations(source)
        assert ids == source_ids  # shard for shard, so the two sides stay paired
        with torch.no_grad():
            torch.testing.assert_close(projected, aligner.project(x_nd, modality))
    # a resubmitted job reuses the aligner and its projections
    assert run_align(config) == (sae_config, metrics)
