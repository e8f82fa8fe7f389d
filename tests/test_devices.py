"""GPUs requested from the Ray cluster, not the driver (`vlsae_ray.devices`), for every kind of work.

The logical-GPU cluster (`gpu_jobs.py`, its own process) declares one GPU with no hardware behind
it: Ray schedules by it, torch in the workers sees no CUDA device, and the work must still run (on
CPU) and give the same results as on the session cluster, which has no GPU.
"""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlsae_ray import storage
from vlsae_ray.activations.extract import run_extract
from vlsae_ray.backbones import builtin_backbone
from vlsae_ray.config import ConfigError, ExtractConfig, ServeConfig, parse_config
from vlsae_ray.devices import gpu_request

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("gpu_jobs.py")
_spec = importlib.util.spec_from_file_location("gpu_jobs", SCRIPT)  # a script beside the tests
gpu_jobs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_jobs)
BLOCK = gpu_jobs.BLOCK


def test_gpu_request_on_a_cluster_without_gpus(ray_cluster, caplog):
    with caplog.at_level(logging.WARNING, logger="vlsae_ray.devices"):
        assert gpu_request("auto", 1.0, "the model actors", "gpus_per_actor") == 0
        assert gpu_request("cpu", 1.0, "the model actors", "gpus_per_actor") == 0
    assert [record.getMessage() for record in caplog.records] == [
        "the model actors run on CPU: the Ray cluster has no GPU"
    ]
    with pytest.raises(ValueError, match=r"device is 'cuda' but the Ray cluster has no GPU.*gpus_per_actor"):
        gpu_request("cuda", 1.0, "the model actors", "gpus_per_actor")


def test_gpu_request_counts_the_gpus_the_autoscaler_can_add(ray_cluster):
    """A GPU worker group that scales from zero (k8s/overlays/prod) has no GPU until work asks for
    one: the node groups the autoscaler publishes in the GCS count, as Ray Train counts them."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    config = autoscaler_pb2.ClusterConfig()
    config.node_group_configs.add(name="gpu", max_count=8).resources["GPU"] = 1
    where = {"namespace": GCS_AUTOSCALER_STATE_NAMESPACE}
    _internal_kv_put(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(), overwrite=True, **where)
    try:
        assert gpu_request("cuda", 1.0, "the model actors", "gpus_per_actor") == 1.0
        assert gpu_request("auto", 0.5, "the model actors", "gpus_per_actor") == 0.5
    finally:
        _internal_kv_del(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, **where)
    assert gpu_request("auto", 0.5, "the model actors", "gpus_per_actor") == 0


def test_device_cuda_on_a_cluster_without_gpus_fails_before_launch(ray_cluster, tmp_path):
    config = ExtractConfig(
        source={"kind": "world", "n_items": 8},
        backbone=builtin_backbone().model_copy(update={"device": "cuda"}),
        hook_points=[BLOCK],
        output=str(tmp_path / "activations"),
    )
    with pytest.raises(ValueError, match="device: auto"):
        run_extract(config)
    assert not storage.exists(storage.join(config.output, BLOCK, "manifest.json"))


def test_gpu_counts_are_whole_above_one():
    base = {"backbone": {"model": "world-clip"}, "saes": {"s": {"sae": "s", "hook_point": "h"}}}
    assert parse_config({**base, "gpus_per_replica": 0.5}, ServeConfig).gpus_per_replica == 0.5
    assert parse_config({**base, "gpus_per_replica": 2}, ServeConfig).gpus_per_replica == 2
    for bad in (1.5, 0):
        with pytest.raises(ConfigError, match=rf"gpus_per_replica.*got {bad}"):
            parse_config({**base, "gpus_per_replica": bad}, ServeConfig)


@pytest.fixture(scope="module")
def logical_gpu_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("logical-gpu")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    subprocess.run(
        [sys.executable, str(SCRIPT), str(root), str(root / "run.json")],
        env=env,
        cwd=REPO,
        check=True,
        timeout=1200,
    )
    return json.loads((root / "run.json").read_text())


@pytest.fixture(scope="module")
def cpu_run(ray_cluster, tmp_path_factory) -> dict:
    return gpu_jobs.run_jobs(str(tmp_path_factory.mktemp("cpu")))


KINDS = {  # what each kind of work requests per actor, replica or task on a GPU cluster (config defaults)
    "extractor_actors": 1.0,
    "serve_replicas": 1.0,
    "evaluate_tasks": 0.25,
    "label_tasks": 0.25,
}


@pytest.mark.slow
def test_every_kind_of_work_requests_a_gpu_on_a_cluster_with_one(logical_gpu_run):
    for kind, gpus in KINDS.items():
        assert logical_gpu_run[kind], kind
        assert all(requested.get("GPU") == gpus for requested in logical_gpu_run[kind]), kind
    probe = logical_gpu_run["probe"]
    # Ray assigned the (logical) GPU; torch sees no CUDA device behind it, so the task ran on CPU
    assert probe["gpu_ids"] and probe["assigned"]["GPU"] == 0.5 and probe["device"] == "cpu"


@pytest.mark.slow
def test_no_gpu_is_requested_on_a_cluster_without_one(cpu_run):
    for kind in KINDS:
        assert cpu_run[kind], kind
        assert all(requested.get("GPU", 0) == 0 for requested in cpu_run[kind]), kind
    assert cpu_run["probe"] == {"gpu_ids": [], "assigned": cpu_run["probe"]["assigned"], "device": "cpu"}
    assert "GPU" not in cpu_run["probe"]["assigned"]


@pytest.mark.slow
def test_work_on_a_logical_gpu_gives_the_cpu_results(cpu_run, logical_gpu_run):
    for key in ("rows", "firing_counts", "served"):
        assert logical_gpu_run[key] == json.loads(json.dumps(cpu_run[key])), key
    assert logical_gpu_run["evaluate"] == pytest.approx(cpu_run["evaluate"], rel=1e-6)
    assert sum(cpu_run["firing_counts"]) > 0 and cpu_run["served"]
