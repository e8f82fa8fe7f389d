"""Sparse autoencoders: architectures, their configs, save and load.

`build_sae(config)` makes an SAE from its config (a dict or a config model); `SparseAutoencoder.load(uri)`
reads a saved one. A new architecture is one module here with a config class and a
`@register(Config)` SparseAutoencoder subclass, imported below.
"""

from __future__ import annotations

import functools
import operator
from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from vlsae_ray.sae.base import ARCHITECTURES, SparseAutoencoder, register
from vlsae_ray.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from vlsae_ray.sae.config import BaseSAEConfig
from vlsae_ray.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from vlsae_ray.sae.kernels import SparseLatents
from vlsae_ray.sae.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from vlsae_ray.sae.relu import ReLUConfig, ReLUSAE
from vlsae_ray.sae.topk import TopKConfig, TopKSAE
from vlsae_ray.sae.vlsae import VLSAE, VLSAEConfig

# The tagged union of every registered architecture's config: embed it as a pydantic field type.
SAEConfig = Annotated[
    functools.reduce(operator.or_, [config_cls for config_cls, _ in ARCHITECTURES.values()]),
    Field(discriminator="architecture"),
]
_sae_config_adapter = TypeAdapter(SAEConfig)


def parse_config(config: BaseSAEConfig | dict[str, Any]) -> BaseSAEConfig:
    """The validated config model of a dict (pydantic ValidationError naming any bad key)."""
    if isinstance(config, BaseSAEConfig):
        return config
    return _sae_config_adapter.validate_python(config)


def build_sae(config: BaseSAEConfig | dict[str, Any]) -> SparseAutoencoder:
    """A freshly initialised SAE of the architecture `config["architecture"]` names."""
    config = parse_config(config)
    return ARCHITECTURES[config.architecture][1](config)


__all__ = [
    "ARCHITECTURES",
    "VLSAE",
    "BaseSAEConfig",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "ReLUConfig",
    "ReLUSAE",
    "SAEConfig",
    "SparseAutoencoder",
    "SparseLatents",
    "TopKConfig",
    "TopKSAE",
    "VLSAEConfig",
    "build_sae",
    "parse_config",
    "register",
]
