"""A RayJob as KubeRay runs it, on the session's local Ray: the dev overlay's extract RayJob, its
entrypoint and runtime env as written, its config from the overlay's ConfigMap, submitted with
`ray job submit` from a folder laid out as the image's /app."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from vlsae_ray import storage
from vlsae_ray.activations import store

REPO = Path(__file__).parents[2]


def image_app_folder(root: Path, configs: dict[str, str]) -> Path:
    """What the pod's /app holds: the Dockerfile's COPY steps, and the ConfigMap over jobs/configs."""
    app = root / "app"
    for folder in ("vlsae_ray", "serve", "jobs"):
        shutil.copytree(REPO / folder, app / folder, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    (app / "jobs" / "configs").mkdir()
    for key, text in configs.items():
        (app / "jobs" / "configs" / key).write_text(text)
    return app


@pytest.mark.slow
def test_dev_extract_rayjob_runs_to_completion_with_ray_job_submit(built, ray_cluster, s3_server, tmp_path):
    objects = built["dev"]
    (job,) = [o for o in objects if o["kind"] == "RayJob" and o["metadata"]["name"] == "vlsae-extract"]
    (configs,) = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "vlsae-job-configs"
    ]
    config = yaml.safe_load(configs["data"]["extract.cluster.yaml"])
    # the dev cluster's bucket, on the session's S3 server (the pods get AWS_ENDPOINT_URL from their Secret)
    s3_server.create_bucket(config["output"].removeprefix("s3://").split("/")[0])
    app = image_app_folder(tmp_path, configs["data"])
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    # KubeRay's submitter runs `ray job submit --runtime-env-json ... -- ENTRYPOINT` against the head;
    # the pod's working directory is the image's /app, here the folder above
    submit = [
        "ray",
        "job",
        "submit",
        "--working-dir",
        str(app),
        "--runtime-env-json",
        json.dumps(runtime_env),
    ]
    submit += ["--", *shlex.split(job["spec"]["entrypoint"])]
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": ray_cluster}
    for _ in range(12):  # a fresh head takes jobs once its dashboard agent has registered
        result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in result.stdout + result.stderr:
            break
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    for hook_point in config["hook_points"]:
        manifest = store.read_manifest(storage.join(config["output"], hook_point))
        assert manifest.complete and manifest.rows == config["source"]["n_items"]
