"""Ray Serve deployments: `POST /encode` turns an uploaded image into its top SAE latents.

Run with `vlsae serve -c CONFIG` (or `serve run serve.app:app_builder sae=... ...`, or the serve
config YAML that `vlsae serve -c CONFIG --print-config` writes, for `serve deploy` and KubeRay).
Requests are batched with `@serve.batch`, so concurrent uploads share one forward pass. Each
replica requests `gpus_per_replica` GPUs when the Ray cluster has GPUs and `backbone.device`
allows (`vlsae_ray.devices`), and runs on the device Ray assigned it.
"""

from typing import Annotated

from fastapi import FastAPI, File, HTTPException, UploadFile
from ray import serve

from serve.schemas import EncodeResponse, ErrorResponse, Latent
from vlsae_ray.config import ServeConfig, parse_config
from vlsae_ray.devices import assigned_device, gpu_request
from vlsae_ray.interpret.encoder import ImageEncoder, NotAnImageError, decode_image

MAX_UPLOAD_BYTES = 20 * 2**20

api = FastAPI(title="vlsae-ray", description="Encode images into sparse, human-readable SAE latents.")


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(api)
class SAEService:
    def __init__(self, config: dict):
        self.config = ServeConfig.model_validate(config)
        self.encoder = ImageEncoder(self.config, assigned_device())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, images: list) -> list:
        return self.encoder.top_latents(images, self.config.top_k)

    @api.post(
        "/encode",
        response_model=EncodeResponse,
        responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}},
    )
    async def encode(
        self, image: Annotated[UploadFile, File(description="an image file (PNG, JPEG, ...)")]
    ) -> EncodeResponse:
        data = await image.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"the upload is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
        try:
            decoded = decode_image(data)
        except NotAnImageError as error:
            raise HTTPException(400, str(error)) from None
        top = await self._encode_batch(decoded)
        return EncodeResponse(
            sae=self.config.sae,
            hook_point=self.config.hook_point,
            latents=[Latent(latent=j, activation=v) for j, v in top],
        )

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}


def build_app(config: ServeConfig):
    gpus = gpu_request(config.backbone.device, config.gpus_per_replica, "Serve replicas", "gpus_per_replica")
    if config.autoscaling is None:
        replicas = {"num_replicas": config.num_replicas}
    else:
        replicas = {"autoscaling_config": config.autoscaling.model_dump()}
    return SAEService.options(**replicas, ray_actor_options={"num_gpus": gpus}).bind(
        config.model_dump(mode="json")
    )


def app_builder(args: dict):
    """Entry point for `serve run serve.app:app_builder key=value ...` and serve config YAMLs."""
    return build_app(parse_config(args, ServeConfig, source="serve args"))
