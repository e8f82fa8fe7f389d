"""Jobs run the way users run them: `ray job submit --working-dir . -- python jobs/....py -c ...`."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.backbones import builtin_backbone

REPO = Path(__file__).parents[2]


@pytest.mark.slow
def test_extract_job_submitted_to_the_cluster(ray_cluster, s3_root, tmp_path):
    config = {
        "source": {"n_items": 40},
        "backbone": builtin_backbone(storage.join(s3_root, "world-clip.pt")).model_dump(),
        "hook_points": ["visual.transformer.resblocks.0"],
        "output": storage.join(s3_root, "acts"),
        "shard_rows": 20,
    }
    config_uri = storage.join(s3_root, "extract.yaml")  # the config itself lives on the object store
    storage.write_text(config_uri, yaml.safe_dump(config))
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": ray_cluster}
    result = subprocess.run(
        ["ray", "job", "submit", "--working-dir", ".", "--", "python", "jobs/extract.py", "-c", config_uri],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    manifest = store.read_manifest(storage.join(s3_root, "acts", "visual.transformer.resblocks.0"))
    assert manifest.rows == 40 and len(manifest.shards) == 2
