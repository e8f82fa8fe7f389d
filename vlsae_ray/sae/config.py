"""Pydantic configs of the SAE architectures: the `sae:` section of every job config.

Each architecture has one config model whose `architecture` field is a Literal tag; the tagged
union of all of them, `SAEConfig`, is assembled in `vlsae_ray.sae` from the registry. Unknown keys
are rejected (`extra="forbid"`) so a typo fails with a message that names it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BaseSAEConfig(BaseModel):
    """Fields every architecture shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_in: int = Field(gt=0, description="width of the activations the SAE reads (d)")
    n_latents: int = Field(gt=0, description="number of latents, the dictionary size (F)")
