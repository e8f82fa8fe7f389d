"""`vlsae demo --s3` as a new user runs it: its own SeaweedFS server, every artifact on S3."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_on_s3_exits_0_and_prints_its_most_monosemantic_latents(ray_cluster, tmp_path):
    import ray

    # The demo starts (and stops) its own S3 server and joins the session's Ray through RAY_ADDRESS,
    # as under `ray job submit`. (Started with a second local Ray of its own, it was followed in one
    # full run by a `ray job submit` test that found no job agent on the session's Ray.)
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    demo = subprocess.run(
        [str(Path(sys.executable).with_name("vlsae")), "demo", "--s3", "--items", "1024"],
        cwd=tmp_path,  # the server's data goes to ./vlsae-demo/s3
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "artifacts under s3://vlsae-demo/demo" in demo.stdout
    # the latent list is read from the object store before the demo stops its server
    rows = re.findall(r"latent +\d+  MS \d\.\d{3}  its top 9 images: \S+=\S+ \(\d+%\); named ", demo.stdout)
    assert len(rows) == 6, demo.stdout[-2000:]
