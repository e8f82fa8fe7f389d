"""The `vlsae` command as a user runs it: a subprocess, with errors as one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlsae_ray.cli import JOBS
from vlsae_ray.config import ServeConfig, load_config

# every job config; kustomization.yaml turns the cluster ones into k8s/'s ConfigMap
CONFIGS = sorted(
    p
    for p in (Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml")
    if p.name != "kustomization.yaml"
)


def vlsae(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlsae_ray.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    models = {name: model for name, (model, _, _) in JOBS.items()} | {"serve": ServeConfig}
    load_config(str(path), models[path.name.split(".")[0]])


def test_bad_config_key_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "activations": "a",
                "sae": {"architecture": "topk", "d_in": 4, "n_latents": 8, "k": 2},
                "output": "o",
                "epochz": 3,
            }
        )
    )
    result = vlsae("train", "-c", str(path))
    assert result.returncode == 2
    assert "epochz: unknown key" in result.stderr and "Traceback" not in result.stderr


def test_missing_bucket_exits_2_before_any_work(s3_server, tmp_path):
    import os

    path = tmp_path / "label.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "sae": "s3://no-such-bucket/sae",
                "activations": "s3://no-such-bucket/a",
                "output": "s3://no-such-bucket/out",
            }
        )
    )
    result = vlsae("label", "-c", str(path), env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr
    assert "bucket 'no-such-bucket'" in result.stderr and "does not exist" in result.stderr
