"""The interpretation API on Ray Serve: encode, interpret, steer and mitigate hallucination, many SAEs
per deployment.

Run with `vlsae serve -c CONFIG` or `serve deploy` of the YAML that `vlsae serve -c CONFIG
--print-config` writes (the Kubernetes RayService holds the same document). Routes are under /v1
and need `Authorization: Bearer KEY` when keys are configured (`ServeConfig.api_keys_file` or the
VLSAE_API_KEYS variable); `GET /healthz` and the concept explorer's static page do not.

A replica holds one backbone and up to `max_loaded_saes` SAEs (Serve model multiplexing: an LRU
keyed by the SAE id; clients may send the `serve_multiplexed_model_id` header with it to be routed
to a replica that has it loaded). Image encodes are batched with `@serve.batch` across requests and
SAEs; the model runs on one worker thread, off the event loop, so health checks and catalog
lookups are answered while a batch computes (and steering's hooks never meet another forward).
"""

import asyncio
import base64
import binascii
import hmac
import io
import ipaddress
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from ray import serve

from serve import schemas
from vlsae_ray import __version__, storage
from vlsae_ray.config import ConfigError, ServeConfig, parse_config
from vlsae_ray.devices import assigned_device, gpu_request
from vlsae_ray.interpret.service import BadInputError, Interpreter, TooLargeError, decode_image, top_concepts
from vlsae_ray.sae.base import load_config

KEYS_ENV = "VLSAE_API_KEYS"
STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = 1

api = FastAPI(
    title="vlsae-ray",
    version=__version__,
    description="Named SAE concepts of images and captions, and steering, over HTTP.",
    generate_unique_id_function=lambda route: route.name,  # operation ids: the handlers' names
)
# mounted before the ingress is declared: Serve routes only what the app holds at that point
api.mount("/static", StaticFiles(directory=STATIC), name="static")
bearer = HTTPBearer(auto_error=False, description="an API key of the server")


async def authorized(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    keys: list[bytes] = request.app.state.api_keys
    if not keys:
        return
    given = (credentials.credentials if credentials else "").encode()
    if not any([hmac.compare_digest(given, key) for key in keys]):  # every key compared: constant time
        raise HTTPException(
            401,
            "missing or wrong API key: send Authorization: Bearer KEY",
            headers={"WWW-Authenticate": "Bearer"},
        )


AUTH = [Depends(authorized)]
ERRORS = {
    status: {"model": schemas.ErrorResponse, "description": description}
    for status, description in {
        400: "the request cannot be answered as asked (not an image, a latent the SAE lacks, ...)",
        401: "missing or wrong API key",
        404: "no such SAE, latent or image",
        413: "an image past the size limits",
        503: "overloaded: retry after the Retry-After header's seconds",
    }.items()
} | {422: {"model": schemas.ValidationErrorResponse, "description": "the request's fields fail the schema"}}


def api_keys(config: ServeConfig) -> list[bytes]:
    """The configured keys: the keys file's lines and the VLSAE_API_KEYS variable's entries."""
    keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",")]
    if config.api_keys_file is not None:
        try:
            keys += storage.read_text(config.api_keys_file).splitlines()
        except FileNotFoundError:
            raise ConfigError(
                f"api_keys_file {config.api_keys_file!r} does not exist (on Kubernetes: create the Secret "
                "vlsae-api-keys, docs/kubernetes.md)"
            ) from None
    return [k.strip().encode() for k in keys if k.strip()]


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _image(data: str) -> object:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "an image is not valid base64") from None
    if len(raw) > schemas.MAX_IMAGE_BYTES:
        raise HTTPException(413, f"an image is larger than {schemas.MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        return decode_image(raw, schemas.MAX_PIXELS)
    except TooLargeError as error:
        raise HTTPException(413, str(error)) from None
    except BadInputError as error:
        raise HTTPException(400, str(error)) from None


@serve.deployment
@serve.ingress(api)
class APIService:
    def __init__(self, config: dict):
        self.config = ServeConfig.model_validate(config)
        api.state.api_keys = api_keys(self.config)
        if not api.state.api_keys and not is_loopback(self.config.host):
            raise ConfigError(
                f"refusing to serve on {self.config.host} without API keys ({KEYS_ENV} or api_keys_file)"
            )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlsae-model")
        self.interpreter = Interpreter(self.config.backbone, assigned_device())
        self._codes.set_max_batch_size(self.config.max_batch_size)
        self._codes.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

        async def load(sae_id: str):
            return await self._run(self.interpreter.load, sae_id, self.config.saes[sae_id])

        self._load = serve.multiplexed(max_num_models_per_replica=self.config.max_loaded_saes)(load)

    async def _run(self, fn, *args, **kwargs):
        """`fn` on the model thread: the event loop keeps answering while it computes."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args, **kwargs))

    async def _served(self, sae_id: str):
        if sae_id not in self.config.saes:
            raise HTTPException(404, f"no SAE {sae_id!r} here; GET /v1/saes lists them")
        return await self._load(sae_id)

    async def _answer(self, fn, *args, **kwargs):
        try:
            return await self._run(fn, *args, **kwargs)
        except BadInputError as error:
            raise HTTPException(400, str(error)) from None

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _codes(self, requests: list[tuple]) -> list:
        return await self._run(self.interpreter.image_codes, requests)

    def check_health(self) -> None:
        if self._executor._shutdown:  # noqa: SLF001 - the model thread is gone: restart the replica
            raise RuntimeError("the model thread has stopped")

    @api.get("/healthz", response_model=schemas.Health)
    async def healthz(self) -> schemas.Health:
        return schemas.Health(status="ok")

    @api.get("/", include_in_schema=False)
    async def explorer(self) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @api.get("/v1/saes", response_model=schemas.SAEList, dependencies=AUTH, responses=ERRORS)
    async def list_saes(self) -> schemas.SAEList:
        infos = []
        for sae_id, entry in self.config.saes.items():
            sae = await self._run(load_config, entry.sae)  # its config only: no weights, no LRU eviction
            infos.append(
                schemas.SAEInfo(
                    id=sae_id,
                    hook_point=entry.hook_point,
                    text_hook_point=entry.text_hook_point,
                    architecture=sae.architecture,
                    d_in=sae.d_in,
                    n_latents=sae.n_latents,
                    has_catalog=entry.catalog is not None,
                )
            )
        return schemas.SAEList(saes=infos)

    @api.get("/v1/saes/{sae}/latents", response_model=schemas.LatentPage, dependencies=AUTH, responses=ERRORS)
    async def search_latents(
        self,
        sae: Annotated[str, PathParam(max_length=64)],
        q: Annotated[
            str | None, Query(max_length=200, description="text the name or runner-up contains")
        ] = None,
        sort: Literal["ms", "confidence", "density"] = "ms",
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> schemas.LatentPage:
        served = await self._served(sae)
        total, found = served.search(q, sort, limit, offset)
        return schemas.LatentPage(sae=sae, total=total, latents=found)

    @api.get(
        "/v1/saes/{sae}/latents/{latent}",
        response_model=schemas.LatentEntry,
        dependencies=AUTH,
        responses=ERRORS,
    )
    async def get_latent(
        self, sae: Annotated[str, PathParam(max_length=64)], latent: Annotated[int, PathParam(ge=0)]
    ) -> schemas.LatentEntry:
        served = await self._served(sae)
        if latent >= served.n_latents:
            raise HTTPException(
                404, f"SAE {sae!r} has {served.n_latents} latents; there is no latent {latent}"
            )
        entry = served.entry(latent)
        for image in entry["top_images"]:
            image["url"] = f"/v1/images/{image['source_id']}"
        return schemas.LatentEntry(sae=sae, **entry)

    @api.get(
        "/v1/images/{source_id:path}",
        dependencies=AUTH,
        response_class=Response,
        responses=ERRORS | {200: {"content": {"image/png": {}}, "description": "the image as PNG"}},
    )
    async def get_image(self, source_id: Annotated[str, PathParam(max_length=200)]) -> Response:
        from vlsae_ray.activations.sources import load_image

        try:
            image = await self._run(load_image, source_id)
        except (KeyError, ValueError):
            raise HTTPException(404, f"no image {source_id!r}: ids are the catalog's top_images") from None
        png = io.BytesIO()
        image.save(png, format="PNG")
        return Response(png.getvalue(), media_type="image/png")

    @api.post("/v1/encode", response_model=schemas.EncodeResponse, dependencies=AUTH, responses=ERRORS)
    async def encode(self, request: schemas.EncodeRequest) -> schemas.EncodeResponse:
        images = [_image(data) for data in request.images]
        served = await self._served(request.sae)
        if request.map_latent is not None and request.map_latent >= served.n_latents:
            raise HTTPException(400, f"map_latent {request.map_latent} is not in SAE {request.sae!r}")
        codes = await asyncio.gather(*(self._codes((served, image)) for image in images))
        maps = [None] * len(images)
        if request.map_latent is not None:
            maps = [
                await self._answer(self.interpreter.patch_map, served, im, request.map_latent)
                for im in images
            ]
        return schemas.EncodeResponse(
            sae=request.sae,
            hook_point=served.config.hook_point,
            results=[
                schemas.EncodeResult(latents=top_concepts(served, z, request.top_k), map=m)
                for z, m in zip(codes, maps, strict=True)
            ],
        )

    @api.post("/v1/interpret", response_model=schemas.InterpretResponse, dependencies=AUTH, responses=ERRORS)
    async def interpret(self, request: schemas.InterpretRequest) -> schemas.InterpretResponse:
        if request.image is None and request.caption is None:
            raise HTTPException(400, "give an image, a caption or both")
        image = None if request.image is None else _image(request.image)
        served = await self._served(request.sae)
        answer = await self._answer(self.interpreter.interpret, served, image, request.caption, request.top_k)
        return schemas.InterpretResponse(sae=request.sae, **answer)

    @api.post("/v1/steer", response_model=schemas.SteerResponse, dependencies=AUTH, responses=ERRORS)
    async def steer(self, request: schemas.SteerRequest) -> schemas.SteerResponse:
        image = _image(request.image)
        served = await self._served(request.sae)
        answer = await self._answer(
            self.interpreter.steer,
            served,
            image,
            [edit.model_dump() for edit in request.edits],
            relative=request.strength == "relative",
            labels=request.labels,
            question=request.question,
            mode=request.mode,
            tokens=request.tokens,
        )
        return schemas.SteerResponse(sae=request.sae, **answer)

    @api.post("/v1/mitigate", response_model=schemas.MitigateResponse, dependencies=AUTH, responses=ERRORS)
    async def mitigate(self, request: schemas.MitigateRequest) -> schemas.MitigateResponse:
        image = _image(request.image)
        served = await self._served(request.sae)
        settings = request.model_dump(include={"alpha", "beta", "cd_alpha", "cd_beta"})
        answer = await self._answer(self.interpreter.mitigate, served, image, request.question, **settings)
        return schemas.MitigateResponse(sae=request.sae, **answer)


def build_app(config: ServeConfig):
    if not is_loopback(config.host) and not (config.api_keys_file or os.environ.get(KEYS_ENV)):
        raise ConfigError(
            f"host {config.host!r} is not loopback: give API keys (api_keys_file, or {KEYS_ENV} on the "
            "cluster's nodes) so that the API is not open to the network"
        )
    gpus = gpu_request(config.backbone.device, config.gpus_per_replica, "Serve replicas", "gpus_per_replica")
    if config.autoscaling is None:
        replicas = {"num_replicas": config.num_replicas}
    else:
        replicas = {"autoscaling_config": config.autoscaling.model_dump()}
    return APIService.options(
        **replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        ray_actor_options={"num_gpus": gpus, "num_cpus": config.cpus_per_replica},
    ).bind(config.model_dump(mode="json", exclude_unset=True))  # as set: defaults are not "given"


def app_builder(args: dict):
    """Entry point for `serve run serve.app:app_builder key=value ...` and serve config YAMLs."""
    return build_app(parse_config(args, ServeConfig, source="serve args"))
