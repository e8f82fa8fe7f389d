"""The API under load over real HTTP (loopback): a mixed load with no errors, a replica killed under
load, and autoscaling from 1 to 2 replicas and back.

The mixed load runs 32 clients x REQUESTS_PER_CLIENT requests. The issue's full size, 32 x 1,000,
takes too long for the suite on 2 shared cores, so it runs when asked:
`VLSAE_LOAD_REQUESTS=1000 pytest tests/serve/test_load.py -k mixed -s` (the default is 40 per client).
Latencies are recorded (printed with -s), never asserted: the machines are shared and noisy.

The fault and autoscaling tests serve their own applications under their own route prefixes beside
the package's `served_world`, with fractional CPUs so that they fit beside it on a 2-CPU Ray.
"""

from __future__ import annotations

import os
import threading
import time

import ray
from ray import serve
from ray.util.state import list_actors

from serve.app import build_app
from serve.load import Call, drive, png, summary
from vlsae_ray.config import ServeConfig
from vlsae_ray.world import generate_items

CLIENTS = 32
REQUESTS_PER_CLIENT = int(os.environ.get("VLSAE_LOAD_REQUESTS", "40"))
IMAGES = [item.image for item in generate_items(8, split="test", seed=3)]


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Seconds until `condition()` held, polling; fails after `timeout_s`."""
    start = time.perf_counter()
    while not condition():
        assert time.perf_counter() - start < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.5)
    return time.perf_counter() - start


def replicas(app: str) -> dict[str, int]:
    """The application's one deployment's replicas by state (RUNNING, STARTING, ...)."""
    (deployment,) = serve.status().applications[app].deployments.values()
    return deployment.replica_states


def healthy(app: str, n: int) -> bool:
    status = serve.status().applications[app]
    (deployment,) = status.deployments.values()
    return status.status == "RUNNING" and deployment.status == "HEALTHY" and replicas(app) == {"RUNNING": n}


def own_app(served_world, name: str, **settings) -> str:
    """`served_world`'s SAEs served again, with `settings`, as application `name` under /name; its
    base URL."""
    config = ServeConfig.model_validate(served_world.config.model_dump(exclude_unset=True) | settings)
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return f"{served_world.url}/{name}"


def replica_actors(app: str, dashboard: str) -> list:
    alive = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
    return [a for a in alive if a.class_name.endswith(f":{app}:APIService")]


def encodes() -> list[tuple]:
    return [("POST", "/v1/encode", {"sae": "block", "images": [png(image)]}) for image in IMAGES]


def in_background(base: str, key: str, clients: int) -> tuple[threading.Thread, threading.Event, list[Call]]:
    """`clients` clients sending encodes until the event is set; their calls as they come. A request
    unanswered after 30 s counts as failed (status 0): one in flight at a replica's kill can stay
    unanswered by Serve's proxy (seen once here), and would hold the test for the default 300 s."""
    stop, calls = threading.Event(), []
    thread = threading.Thread(
        target=drive, args=(base, key, encodes(), clients, 10**6, stop, calls), kwargs={"timeout_s": 30}
    )
    thread.start()
    return thread, stop, calls


def test_mixed_load_has_no_errors(served_world):
    item = generate_items(1, split="test", seed=4)[0]
    image = png(item.image)
    steer = {
        "sae": "block",
        "image": image,
        "edits": [{"latent": 3, "op": "scale", "value": 2.0}],
        "labels": ["a red object", "a blue object"],
    }
    mix = [
        ("POST", "/v1/encode", {"sae": "block", "images": [image]}),
        ("GET", "/v1/saes/block/latents/3", None),
        ("POST", "/v1/interpret", {"sae": "vl", "image": image, "caption": item.caption}),
        ("GET", "/healthz", None),
        ("POST", "/v1/encode", {"sae": "vl", "images": [png(IMAGES[1])], "top_k": 3}),
        ("GET", "/v1/saes/block/latents?q=red&sort=confidence", None),
        ("POST", "/v1/steer", steer),
        ("GET", "/v1/saes", None),
    ]
    calls = drive(served_world.url, served_world.key, mix, CLIENTS, REQUESTS_PER_CLIENT)
    result = summary(calls)
    print(f"\nmixed load, {CLIENTS} clients x {REQUESTS_PER_CLIENT} requests: {result}")
    assert result["requests"] == CLIENTS * REQUESTS_PER_CLIENT
    failed = [(c.route, c.status) for c in calls if c.status != 200]
    assert not failed, failed[:10]
    assert {c.route for c in calls} == {route for _, route, _ in mix}


def test_a_replica_killed_under_load_is_replaced_and_only_its_requests_fail(served_world, ray_cluster):
    """Two replicas taking at most 4 requests each, under 12 clients: killing one fails at most the
    4 requests it held; the other serves on, Serve starts a replacement, and every request sent
    once it runs succeeds."""
    app, ongoing = "fault", 4
    base = own_app(
        served_world,
        app,
        num_replicas=2,
        cpus_per_replica=0.25,
        max_batch_size=ongoing,
        max_ongoing_requests=ongoing,
    )
    try:
        wait_for(lambda: healthy(app, 2), 120, "two replicas running")
        thread, stop, calls = in_background(base, served_world.key, 12)
        try:
            wait_for(lambda: sum(c.status == 200 for c in calls) >= 40, 120, "40 answers before the kill")
            victim = replica_actors(app, ray_cluster)[0]
            killed_at = time.perf_counter()
            ray.kill(ray.get_actor(victim.name, namespace=victim.ray_namespace), no_restart=True)
            replaced_s = wait_for(
                lambda: (
                    len([a for a in replica_actors(app, ray_cluster) if a.actor_id != victim.actor_id]) == 2
                    and healthy(app, 2)
                ),
                180,
                "a replacement replica running",
            )
            replaced_at = killed_at + replaced_s
            wait_for(lambda: sum(c.start > replaced_at for c in calls) >= 40, 120, "40 answers after it")
        finally:
            stop.set()
            thread.join()
    finally:
        serve.delete(app)
    failed = [c for c in calls if c.status != 200]
    in_flight = sum(c.start <= killed_at <= c.end for c in calls)
    print(
        f"\nkill under load: {len(calls)} requests, {in_flight} in flight at the kill (both replicas), "
        f"{len(failed)} failed {sorted({c.status for c in failed})}, replaced after {replaced_s:.1f} s"
    )
    assert len(failed) <= ongoing
    assert all(c.start <= killed_at for c in failed)  # only requests sent before the kill
    after = [c for c in calls if c.start > replaced_at]
    assert after and all(c.status == 200 for c in after)


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(served_world):
    app = "scale"
    base = own_app(
        served_world,
        app,
        autoscaling={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 2,
        },
        cpus_per_replica=0.25,
        max_batch_size=4,
        max_ongoing_requests=4,
    )
    try:
        wait_for(lambda: healthy(app, 1), 120, "one replica running")
        thread, stop, calls = in_background(base, served_world.key, 16)
        try:
            up_s = wait_for(lambda: healthy(app, 2), 180, "a second replica under load")
        finally:
            stop.set()
            thread.join()
        down_s = wait_for(lambda: healthy(app, 1), 240, "back to one replica without load")
    finally:
        serve.delete(app)
    print(f"\nautoscaling: 1 -> 2 replicas {up_s:.1f} s into the load, 2 -> 1 {down_s:.1f} s after it")
    assert calls and all(c.status == 200 for c in calls)
