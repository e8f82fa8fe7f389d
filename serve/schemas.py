"""The HTTP wire format: pydantic models that FastAPI turns into the OpenAPI schema."""

from pydantic import BaseModel, Field


class Latent(BaseModel):
    latent: int = Field(description="index of the SAE latent")
    activation: float = Field(description="its activation on the image, in the backbone's raw units")


class EncodeResponse(BaseModel):
    sae: str = Field(description="URI of the SAE that encoded the image")
    hook_point: str
    latents: list[Latent] = Field(description="the image's largest active latents, largest first")


class ErrorResponse(BaseModel):
    detail: str
