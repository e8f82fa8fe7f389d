import pytest
from pydantic import BaseModel, ValidationError

from vlsae_ray.sae import ReLUConfig, ReLUSAE, SAEConfig, TopKConfig, TopKSAE, build_sae, parse_config

TOPK = {"architecture": "topk", "d_in": 16, "n_latents": 64, "k": 4}


class JobConfig(BaseModel):
    sae: SAEConfig


def test_dict_and_model_build_the_registered_architecture():
    assert isinstance(build_sae(TOPK), TopKSAE)
    assert isinstance(build_sae(ReLUConfig(d_in=16, n_latents=64)), ReLUSAE)
    assert parse_config(TOPK) == TopKConfig(d_in=16, n_latents=64, k=4)


def test_sae_config_embeds_as_a_tagged_field():
    job = JobConfig.model_validate({"sae": {"architecture": "relu", "d_in": 8, "n_latents": 32}})
    assert isinstance(job.sae, ReLUConfig)
    assert JobConfig.model_validate_json(job.model_dump_json()) == job


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({**TOPK, "kk": 4}, "kk"),  # a typo'd key
        ({**TOPK, "n_latent": 64}, "n_latent"),
        ({**TOPK, "k": 65}, "k=65"),  # more active latents than latents
        ({**TOPK, "aux_k": 100}, "aux_k=100"),
        ({**TOPK, "d_in": 0}, "d_in"),
        ({**TOPK, "k": 0}, "k"),
        ({"architecture": "relu", "d_in": 8, "n_latents": 8, "l1_coefficient": -1.0}, "l1_coefficient"),
        ({**TOPK, "architecture": "topkk"}, "topkk"),
    ],
)
def test_bad_config_names_the_bad_key(config, named):
    with pytest.raises(ValidationError) as error:
        build_sae(config)
    assert named in str(error.value)


def test_aux_k_defaults_to_half_the_width():
    assert TopKConfig(**{k: v for k, v in TOPK.items() if k != "architecture"}).aux_k_latents == 8
    assert TopKConfig(d_in=512, n_latents=64, k=4).aux_k_latents == 64
