"""The committed OpenAPI document: `python -m serve.openapi` rewrites serve/openapi.json from the app.

A test fails when the app's schema drifts from the committed file, so clients generated from it
(and the docs) stay true; it needs no model, no GPU and no running server.
"""

import json
from pathlib import Path

from serve.app import api

PATH = Path(__file__).with_name("openapi.json")


def render() -> str:
    return json.dumps(api.openapi(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    PATH.write_text(render())
    print(f"wrote {PATH.name}")
