"""Extraction on a real local Ray, to a local folder and to the SeaweedFS server."""

import pytest
import torch

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.extract import run_extract
from vlsae_ray.activations.sources import load_image, source_items
from vlsae_ray.backbones import Backbone, builtin_backbone
from vlsae_ray.config import ExtractConfig, SourceConfig

HOOKS = ["visual.transformer.resblocks.1", "visual"]


def extract_config(root: str, n_items: int = 48) -> ExtractConfig:
    backbone = builtin_backbone(storage.join(root, "world-clip.pt"))
    return ExtractConfig.model_validate(
        {
            "source": {"n_items": n_items},
            "backbone": backbone.model_dump(),
            "hook_points": HOOKS,
            "output": storage.join(root, "acts"),
            "shard_rows": 16,
            "batch_size": 8,
        }
    )


@pytest.mark.slow
def test_extract_matches_direct_forward_and_resumes(ray_cluster, store_root):
    config = extract_config(store_root)
    summary = run_extract(config)
    assert (summary.rows, summary.shards_written, summary.shards_skipped) == (48, 3, 0)

    backbone = Backbone(config.backbone)
    items = source_items(config.source)
    expected = backbone.activations(backbone.pixels([load_image(item["id"]) for item in items]), HOOKS)
    for hook in HOOKS:
        x, ids = store.load_activations(summary.datasets[hook])
        assert ids == [item["id"] for item in items]  # every row traces back to its item, once, in order
        torch.testing.assert_close(x, expected[hook].half().float(), atol=2e-3, rtol=2e-3)

    # A job killed after writing shard 2 but before committing it: the rerun writes only that shard.
    dataset = summary.datasets[HOOKS[0]]
    manifest = store.read_manifest(dataset)
    before, _ = store.load_activations(dataset)
    other_hook = store.read_manifest(summary.datasets["visual"])
    store.commit(dataset, manifest.model_copy(update={"shards": manifest.shards[:2]}), [])
    storage.delete(storage.join(dataset, manifest.shards[2].name))
    rerun = run_extract(config)
    assert (rerun.shards_written, rerun.shards_skipped) == (1, 2)
    after, after_ids = store.load_activations(dataset)
    assert torch.equal(before, after) and len(set(after_ids)) == 48
    assert store.read_manifest(summary.datasets["visual"]) == other_hook  # its committed shard 2 was kept


def test_extract_refuses_a_different_dataset_at_the_output(ray_cluster, tmp_path):
    config = extract_config(str(tmp_path), n_items=16)
    run_extract(config)
    other = config.model_copy(update={"source": SourceConfig(n_items=20)})
    with pytest.raises(ValueError, match="already holds a different activation dataset.*'n_items': 16"):
        run_extract(other)


def test_bad_hook_point_fails_before_any_work(tmp_path):
    config = extract_config(str(tmp_path)).model_copy(
        update={"hook_points": ["visual.transformer.resblocks.99"]}
    )
    with pytest.raises(ValueError, match="valid hook points"):
        run_extract(config)
    assert not storage.exists(storage.join(config.output, "visual.transformer.resblocks.99", "manifest.json"))
