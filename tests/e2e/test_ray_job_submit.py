"""Jobs run the way users run them: `ray job submit --working-dir . -- python jobs/....py -c ...`."""

import os
import subprocess
import time
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
    # a freshly started head accepts jobs once its dashboard agent has registered; on a loaded
    # machine that can take a while, and the job API says so ("try again later")
    submit = ["ray", "job", "submit", "--working-dir", ".", "--"]
    submit += ["python", "jobs/extract.py", "-c", config_uri]
    for _ in range(12):
        result = subprocess.run(
            submit,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if "No available agent to submit job" not in result.stdout + result.stderr:
            break
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    manifest = store.read_manifest(storage.join(s3_root, "acts", "visual.transformer.resblocks.0"))
    assert manifest.rows == 40 and len(manifest.shards) == 2
