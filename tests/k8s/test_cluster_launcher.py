"""cluster/aws.yaml, Ray's cluster launcher config for VMs, against the schema inside the `ray` package."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).parents[2]
LAUNCHER = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_config_is_valid_as_ray_up_reads_it():
    jsonschema.validate(LAUNCHER, SCHEMA)  # as written
    validate_config(prepare_config(copy.deepcopy(LAUNCHER)))  # with the AWS defaults `ray up` fills in


@pytest.mark.parametrize(
    ("key", "bad_key"), [("idle_timeout_minutes", "idle_timout_minutes"), ("head_node_type", "head_type")]
)
def test_a_misspelt_key_is_rejected(key, bad_key):
    config = copy.deepcopy(LAUNCHER)
    config[bad_key] = config.pop(key)
    with pytest.raises(jsonschema.ValidationError, match=f"'{bad_key}' was unexpected"):
        validate_config(prepare_config(config))


def test_launcher_runs_the_prod_image_with_token_auth_and_gpus_from_zero(built):
    (cluster,) = [o for o in built["prod"] if o["kind"] == "RayCluster"]
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert LAUNCHER["docker"]["image"] == head["image"]
    assert "--env RAY_AUTH_MODE=token" in LAUNCHER["docker"]["run_options"]
    types = LAUNCHER["available_node_types"]
    assert types[LAUNCHER["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu"]["min_workers"] == 0 < types["gpu"]["max_workers"]
