"""What made an artifact: the job config, the code version and the time, saved next to it."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel

import vlsae_ray
from vlsae_ray import storage

RUN_FILE = "run.json"


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(vlsae_ray.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{vlsae_ray.__version__}+{commit}" if commit else vlsae_ray.__version__


def write_run_info(folder: str, job: str, config: BaseModel, **results) -> None:
    """Write `run.json` (job, config, code version, time, results) into the artifact folder."""
    info = {
        "job": job,
        "config": config.model_dump(mode="json"),
        "code_version": code_version(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
    }
    storage.write_text(storage.join(folder, RUN_FILE), json.dumps(info, indent=1))


def read_run_info(folder: str) -> dict:
    return json.loads(storage.read_text(storage.join(folder, RUN_FILE)))
