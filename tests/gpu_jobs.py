"""Extraction, evaluate, label and Serve on the Ray cluster this process joined, with the resources
Ray scheduled each kind of work with (read back through the Ray state API).

test_devices.py imports `run_jobs` on the session cluster (no GPU). Run as a script (argv: ROOT
OUT_JSON) it first starts its own local Ray declaring one logical GPU: Ray schedules by it, but no
hardware is behind it, so torch in the workers sees no CUDA device. It runs in its own process
because a process joins one Ray only and the session cluster has no GPU.
"""

import base64
import io
import json
import sys

import torch

BLOCK, EMBEDDING = "visual.transformer.resblocks.2", "visual"


def _probe():
    """What a task requesting a GPU share (when the cluster has one) was given, from inside it."""
    import ray

    from vlsae_ray.devices import assigned_device

    context = ray.get_runtime_context()
    return {
        "gpu_ids": ray.get_gpu_ids(),
        "assigned": context.get_assigned_resources(),
        "device": str(assigned_device()),
    }


def run_jobs(root: str) -> dict:
    import ray
    from ray import serve
    from ray.util.state import list_actors, list_tasks

    from serve.app import build_app
    from serve.schemas import EncodeRequest
    from vlsae_ray.activations import store
    from vlsae_ray.activations.extract import run_extract
    from vlsae_ray.activations.sources import load_image, package_photo_items
    from vlsae_ray.backbones import builtin_backbone
    from vlsae_ray.config import EvaluateConfig, ExtractConfig, LabelConfig, ServeConfig
    from vlsae_ray.devices import gpu_request
    from vlsae_ray.eval.evaluate import run_evaluate
    from vlsae_ray.interpret.catalog import read_catalog
    from vlsae_ray.interpret.label import run_label
    from vlsae_ray.local_stack import free_port
    from vlsae_ray.sae import build_sae

    gpus = gpu_request("auto", 0.5, "the probe task", "num_gpus")
    probe = ray.get(ray.remote(num_gpus=gpus, num_cpus=0)(_probe).remote())

    extract = run_extract(
        ExtractConfig(
            source={"kind": "world", "n_items": 64, "seed": 0},
            backbone=builtin_backbone(),
            hook_points=[BLOCK, EMBEDDING],
            output=f"{root}/activations",
            shard_rows=32,
            batch_size=32,
        )
    )
    x_nd, _ = store.load_activations(extract.datasets[BLOCK])
    torch.manual_seed(0)
    sae = build_sae({"architecture": "topk", "d_in": x_nd.shape[1], "n_latents": 4 * x_nd.shape[1], "k": 4})
    sae.init_from_data(x_nd)
    sae.save(f"{root}/sae")
    evaluate = run_evaluate(
        EvaluateConfig(
            sae=f"{root}/sae",
            activations=extract.datasets[BLOCK],
            embeddings=extract.datasets[EMBEDDING],
            grid_latents=0,
            batch_size=16,
            shards_per_task=1,
            output=f"{root}/report",
        )
    )
    label = run_label(
        LabelConfig(
            sae=f"{root}/sae",
            activations=extract.datasets[BLOCK],
            naming="none",
            batch_size=16,
            output=f"{root}/labels",
        )
    )

    config = ServeConfig(
        backbone=builtin_backbone(),
        saes={"demo": {"sae": f"{root}/sae", "hook_point": BLOCK}},
        port=free_port(),
    )
    serve.start(http_options={"host": "127.0.0.1", "port": config.port})  # no-op if Serve already runs
    handle = serve.run(build_app(config), name="vlsae-gpu-jobs", route_prefix="/gpu-jobs")
    image = load_image(package_photo_items(1)[0]["id"])
    png = io.BytesIO()
    image.save(png, format="PNG")
    request = EncodeRequest(sae="demo", images=[base64.b64encode(png.getvalue()).decode()])
    served = handle.encode.remote(request).result(timeout_s=120).results[0].latents
    cluster = {
        "address": ray.get_runtime_context().gcs_address,
        "detail": True,
        "limit": 10000,
    }  # not others' Rays
    actors = list_actors(**cluster, raise_on_missing_output=False)
    serve.delete("vlsae-gpu-jobs")
    tasks = list_tasks(**cluster, raise_on_missing_output=False)

    def requested(states: list, name: str) -> list[dict]:
        """The resources each actor (by class name) or task (by name) containing `name` asked for."""
        return [s.required_resources for s in states if name in (getattr(s, "class_name", None) or s.name)]

    return {
        "probe": probe,
        "extractor_actors": requested(actors, "_Extractor"),
        "serve_replicas": requested(actors, "APIService"),
        "evaluate_tasks": requested(tasks, "_first_partial") + requested(tasks, "_ms_partial"),
        "label_tasks": requested(tasks, "_shard_top_k"),
        "rows": extract.rows,
        "evaluate": [evaluate.fvu, evaluate.l0, evaluate.dead_fraction, evaluate.ms_latents_median],
        "firing_counts": [row["firing_count"] for row in read_catalog(label.catalog).to_pylist()],
        "served": served,
    }


if __name__ == "__main__":
    import os

    from vlsae_ray.local_stack import connect_ray, free_port

    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    connect_ray(num_cpus=2, num_gpus=1, dashboard_port=free_port())  # the dashboard serves the state API
    with open(sys.argv[2], "w") as out:
        json.dump(run_jobs(sys.argv[1]), out)
