"""`vlsae demo --s3` as a new user runs it: its own SeaweedFS and Ray, every artifact on S3."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_on_s3_exits_0_and_prints_its_most_monosemantic_latents(tmp_path):
    # the demo starts (and stops) its own Ray and S3 server: nothing of the test session's
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_ADDRESS", "AWS_"))}
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
