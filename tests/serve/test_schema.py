"""The API's schema: the committed serve/openapi.json is the app's, every route documents its
errors and keys, and a fuzzer driven by the served schema (schemathesis) finds no server error and
no response outside the schema on any route, with and without a key."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serve.openapi import PATH, render

# no 5xx, no status code, content type or body the schema does not document
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_committed_openapi_is_the_apps():
    assert PATH.read_text() == render(), "the API changed: run `python -m serve.openapi` and commit it"


def test_routes_have_unique_ids_documented_errors_and_security():
    spec = json.loads(render())
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)) >= 8
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path == "/healthz":
                assert "security" not in op
                continue
            assert op["security"] == [{"HTTPBearer": []}], (method, path)
            assert {"400", "401", "404", "413", "422", "503"} <= set(op["responses"]), (method, path)


@pytest.mark.parametrize("key", ["right", "wrong"])
def test_fuzz_every_route(served_world, key, tmp_path):
    """schemathesis's CLI over every operation of the served schema: examples, coverage and fuzzed
    requests, valid and invalid by the schema; with the right key and with a wrong one."""
    token = served_world.key if key == "right" else "wrong"
    command = [
        str(Path(sys.executable).with_name("st")), "run", f"{served_world.url}/openapi.json",
        "--checks", CHECKS, "--max-examples", "30", "--seed", "0", "--request-timeout", "60",
        "--header", f"Authorization: Bearer {token}",
        "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml"),
    ]  # fmt: skip
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )  # its cache there
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = (tmp_path / "junit.xml").read_text()
    assert report.count("<testcase") >= 8, report[:2000]  # every operation was fuzzed
