"""Shared fixtures: a real SeaweedFS S3 server and a real local Ray, both on loopback.

`store_root` runs a test once on a local folder and once on an `s3://` bucket of the server.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

import vlsae_ray  # noqa: F401  (torchvision guard, offline switches)
from vlsae_ray.local_stack import SeaweedFS, connect_ray, free_port

TEST_BUCKET = "vlsae-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    saved = {
        key: os.environ.get(key) for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    server = SeaweedFS(str(tmp_path_factory.mktemp("seaweedfs")), buckets=(TEST_BUCKET,)).start()
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_root(s3_server) -> str:
    """A fresh prefix in the test bucket."""
    return f"s3://{TEST_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_root")


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> str:
    """A local Ray on loopback; yields its job API address. Started after the S3 server so workers
    inherit its endpoint."""
    import ray

    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    # the cluster's `python` is the one with this project installed, as on a user's cluster image
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    port = free_port()
    connect_ray(num_cpus=2, dashboard_port=port)
    yield f"http://127.0.0.1:{port}"
    ray.shutdown()
