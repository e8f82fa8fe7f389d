"""Shared by the Ray Train tests: comparing SAEs, waiting for a checkpoint, killing a worker."""

import os
import signal
import time

import pytest
import torch
from ray.util.state import list_actors

from vlsae_ray.sae import SparseAutoencoder


@pytest.fixture
def assert_same_sae():
    def check(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
        for name, tensor in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)

    return check


@pytest.fixture
def wait_for():
    def wait(ready, finished) -> None:
        """Until `ready()` (or the run is over, or 4 minutes have passed)."""
        deadline = time.monotonic() + 240
        while not ready() and not finished() and time.monotonic() < deadline:
            time.sleep(0.05)

    return wait


@pytest.fixture
def kill_a_worker():
    def kill(ray_cluster: str) -> None:
        alive_workers = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        workers = list_actors(address=ray_cluster, filters=alive_workers)
        os.kill(workers[-1].pid, signal.SIGKILL)

    return kill
