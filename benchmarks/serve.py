"""The HTTP API under load vs the same model's batched forward in process.

For each model: one replica of the API (`serve.app.build_app`) on a local Ray Serve, loopback,
holding one SAE (`build_sae` at the model's hook point, random weights, saved to a temp dir);
`clients` concurrent clients (1, 8, 32), each with its own keep-alive connection, send
`POST /v1/encode` with one world image per request. Reported: requests/s (answered with 200 over
the wall time) and p50/p99 latency. Against it: `Interpreter.image_codes` of the same model and SAE
in this process on batches of `max_batch_size` images (the replica's `@serve.batch` size), images/s,
on the same images; ratio = served requests/s / in-process images/s.

The replica reserves all of the local Ray's CPUs (`cpus_per_replica`), so its torch runs on as many
threads as the in-process forward (torch's default: one per core). The clients run in this process,
on the same cores. Since other users share these cores, CPU time is reported too, as it depends
less on their load than wall time: the CPU ms each role (clients, Serve's HTTP proxy, the replica)
spent per request, the in-process forward's CPU ms per image, and their CPU ratio (in-process CPU
per image / served CPU per request, all roles).

Two models: the built-in world CLIP (tiny: HTTP, JSON and PNG decoding per request dominate) and
open_clip ViT-B-32 built from its config with random weights (`pretrained=None`; no download).

The load client (`serve.load`) is the one `tests/serve/test_load.py` uses.

    PYTHONPATH=. .venv/bin/python -m benchmarks.serve [--models world-clip ViT-B-32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from serve.load import drive, png, summary


def models() -> dict:
    """model -> (backbone, hook point, images of the in-process run, requests per client at 1, 8
    and 32 clients)."""
    from vlsae_ray.backbones import builtin_backbone
    from vlsae_ray.config import BackboneConfig

    return {
        "world-clip": (builtin_backbone(), "visual.transformer.resblocks.2", 2048, (200, 100, 40)),
        "ViT-B-32": (
            BackboneConfig(model="ViT-B-32", pretrained=None),
            "visual.transformer.resblocks.10",
            256,
            (32, 16, 8),
        ),
    }


def in_process(interpreter, served, images: list, batch_size: int) -> tuple[float, float]:
    """Images/s of `Interpreter.image_codes` on batches of `batch_size`, and its CPU ms per image."""
    interpreter.image_codes([(served, image) for image in images[:batch_size]])  # warm-up
    cpu, start = cpu_seconds()["client"], time.perf_counter()
    for i in range(0, len(images), batch_size):
        interpreter.image_codes([(served, image) for image in images[i : i + batch_size]])
    wall = time.perf_counter() - start
    return len(images) / wall, 1000 * (cpu_seconds()["client"] - cpu) / len(images)


def serve_one(config, name: str) -> str:
    """Serve `config` as application `name` under /name; its base URL."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{config.port}/{name}"


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this process (the clients), Serve's HTTP proxy and the replicas:
    Ray's processes are this driver's descendants, named by their actor class."""
    import psutil

    used = {"client": sum(psutil.Process().cpu_times()[:2])}
    for process in psutil.Process().children(recursive=True):
        try:
            title = process.cmdline()[0]
            seconds = sum(process.cpu_times()[:2])
        except (psutil.Error, IndexError):
            continue
        for role, prefix in (("proxy", "ray::ProxyActor"), ("replica", "ray::ServeReplica")):
            if title.startswith(prefix):
                used[role] = used.get(role, 0.0) + seconds
    return used


def bench_model(name: str, root: str, port: int, cpus: float) -> list[dict]:
    import torch

    from vlsae_ray.backbones import hook_dims
    from vlsae_ray.config import ServeConfig
    from vlsae_ray.interpret.service import Interpreter
    from vlsae_ray.sae import build_sae
    from vlsae_ray.world import generate_items

    backbone, hook, n_images, per_client = models()[name]
    d = hook_dims(backbone, [hook])[hook]
    build_sae({"architecture": "topk", "d_in": d, "n_latents": 8 * d, "k": 32}).save(f"{root}/{name}")
    config = ServeConfig(
        backbone=backbone,
        saes={"sae": {"sae": f"{root}/{name}", "hook_point": hook}},
        port=port,
        cpus_per_replica=cpus,
    )
    images = [item.image for item in generate_items(n_images, seed=5)]
    interpreter = Interpreter(backbone)
    served = interpreter.load("sae", config.saes["sae"])
    local, local_cpu_ms = in_process(interpreter, served, images, config.max_batch_size)
    del interpreter, served
    base = serve_one(config, name)
    bodies = [("POST", "/v1/encode", {"sae": "sae", "images": [png(image)]}) for image in images[:64]]
    drive(base, None, bodies, 8, 4)  # warm-up: the SAE loaded, the batcher started
    rows = []
    for clients, count in zip((1, 8, 32), per_client, strict=True):
        before = cpu_seconds()
        result = summary(drive(base, None, bodies, clients, count))
        assert result["errors"] == 0, result
        after = cpu_seconds()
        cpu_ms = {
            role: round(1000 * (after[role] - before.get(role, 0.0)) / count / clients, 1) for role in after
        }
        rows.append(
            {
                "model": name,
                "clients": clients,
                **result,
                "in_process_images_per_s": round(local, 1),
                "ratio": round(result["requests_per_s"] / local, 2),
                "cpu_ms_per_request": cpu_ms,
                "in_process_cpu_ms_per_image": round(local_cpu_ms, 1),
                "cpu_ratio": round(local_cpu_ms / sum(cpu_ms.values()), 2),
                "batch_size": config.max_batch_size,
                "torch_threads_in_process": torch.get_num_threads(),
                "replica_cpus": cpus,
                "load_average": os.getloadavg(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    from ray import serve

    serve.delete(name)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["world-clip", "ViT-B-32"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    import ray
    from ray import serve

    from vlsae_ray.local_stack import connect_ray, free_port

    connect_ray()
    port = free_port()
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as root:
            for name in args.models:
                rows += bench_model(name, root, port, ray.cluster_resources()["CPU"])
    finally:
        serve.shutdown()
        ray.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(rows, indent=1))
    table = [
        "| model | clients | requests | requests/s | p50 ms | p99 ms | in-process images/s | ratio | "
        "CPU ms per request: client, proxy, replica | in-process CPU ms per image | CPU ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['model']} | {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | "
        f"{r['p99_ms']} | {r['in_process_images_per_s']} | {r['ratio']} | "
        + ", ".join(str(r["cpu_ms_per_request"].get(k)) for k in ("client", "proxy", "replica"))
        + f" | {r['in_process_cpu_ms_per_image']} | {r['cpu_ratio']} |"
        for r in rows
    ]
    (out / "serve.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
