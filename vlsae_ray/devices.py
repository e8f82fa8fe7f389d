"""Where work runs: GPUs requested from the Ray cluster, and the device a worker was given.

The driver decides what each actor, task or replica asks for from the cluster it joined
(`ray.cluster_resources()`), never from its own hardware: under `ray job submit` the driver runs
on the head node, which often has no GPU while the workers do. Inside the actor, task or replica
the device is what Ray assigned it (`ray.get_gpu_ids()`), so it never takes a GPU it did not ask for.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


def gpu_request(device: str, gpus: float, work: str, key: str) -> float:
    """GPUs each of `work`'s actors, tasks or replicas requests (`gpus`, the config's `key`, or 0).

    device "cpu" requests none; "auto" requests `gpus` when the cluster has a GPU, or its autoscaler
    can add one, and otherwise runs on CPU and says so; "cuda" requests `gpus` and fails before launch
    on a cluster that has none and cannot get one.
    """
    import ray

    from vlsae_ray.local_stack import connect_ray

    if device == "cpu":
        return 0.0
    connect_ray()
    if ray.cluster_resources().get("GPU", 0) > 0 or _autoscaler_gpus() > 0:
        return gpus
    if device == "cuda":
        raise ValueError(
            f"device is 'cuda' but the Ray cluster has no GPU, so {work} cannot be given one ({key}); "
            "add GPU nodes, or set device: auto (CPU when the cluster has no GPU) or device: cpu"
        )
    log.warning("%s run on CPU: the Ray cluster has no GPU", work)
    return 0.0


def _autoscaler_gpus() -> int:
    """GPUs the cluster's autoscaler may add: a GPU worker group that scales from zero (KubeRay, the
    VM launcher) has no GPU node until work asks for one. Ray Train checks its workers against the
    same node groups, which the autoscaler publishes; none without an autoscaler."""
    from ray._private.state import state

    return (state.get_max_resources_from_cluster_config() or {}).get("GPU", 0)


def assigned_device() -> torch.device:
    """Inside a Ray actor, task or replica: cuda when Ray assigned it a GPU that torch can use, else cpu.

    Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs, so cuda:0 is the first of them. A GPU that
    Ray lists but torch cannot see (a node declaring logical GPUs, a CPU build of torch) means CPU.
    """
    import ray

    gpu_ids = ray.get_gpu_ids()
    if not gpu_ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        _say_no_cuda(tuple(gpu_ids))
        return torch.device("cpu")
    return torch.device("cuda")


@functools.cache  # once per worker process, not per task
def _say_no_cuda(gpu_ids: tuple) -> None:
    log.warning("Ray assigned GPU %s but torch sees no CUDA device: running on CPU", list(gpu_ids))
