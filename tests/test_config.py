import pytest
import yaml

from vlsae_ray import storage
from vlsae_ray.config import ConfigError, ExtractConfig, TrainConfig, load_config

TRAIN = {
    "activations": "s3://b/acts",
    "sae": {"architecture": "topk", "d_in": 128, "n_latents": 1024, "k": 16},
    "training": {"batch_size": 256},
    "output": "s3://b/sae",
}


def write(tmp_path, raw) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_valid_config_loads(tmp_path):
    config = load_config(write(tmp_path, TRAIN), TrainConfig)
    assert config.sae.k == 16 and config.training.batch_size == 256 and config.training.num_workers == 2


def test_unknown_key_is_named(tmp_path):
    raw = {**TRAIN, "training": {"batch_sise": 256}}
    with pytest.raises(ConfigError, match=r"training\.batch_sise: unknown key"):
        load_config(write(tmp_path, raw), TrainConfig)


def test_unknown_sae_key_is_named(tmp_path):
    raw = {**TRAIN, "sae": {**TRAIN["sae"], "kk": 3}}
    with pytest.raises(ConfigError, match=r"sae\.topk\.kk: unknown key"):
        load_config(write(tmp_path, raw), TrainConfig)


def test_bad_value_names_key_and_value(tmp_path):
    raw = {**TRAIN, "training": {"batch_size": -5}}
    with pytest.raises(ConfigError, match=r"training\.batch_size: .*greater than 0 \(got -5\)"):
        load_config(write(tmp_path, raw), TrainConfig)


def test_missing_key_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="output: required key is missing"):
        load_config(write(tmp_path, {k: v for k, v in TRAIN.items() if k != "output"}), TrainConfig)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"), TrainConfig)


def test_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, [1, 2]), ExtractConfig)


def test_config_from_s3(s3_root):
    uri = storage.join(s3_root, "train.yaml")
    storage.write_text(uri, yaml.safe_dump(TRAIN))
    assert load_config(uri, TrainConfig).output == "s3://b/sae"
