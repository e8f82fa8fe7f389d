"""The HTTP wire format: pydantic models that FastAPI turns into the OpenAPI schema.

The limits are part of the schema (`maxLength`, `maxItems`, ...), so the documented schema says
what the server accepts; a pixel count past MAX_PIXELS is answered 413 once the image's header is
read.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_IMAGE_BYTES = 8 * 2**20
MAX_PIXELS = 4096 * 4096
MAX_IMAGES = 16
MAX_EDITS = 32
MAX_LABELS = 64
MAX_TOP_K = 256

# base64 grows bytes by 4/3
Base64Image = Annotated[
    str,
    Field(
        min_length=1,
        max_length=4 * (MAX_IMAGE_BYTES // 3 + 1),
        description=f"an image file (PNG, JPEG, ...) encoded as base64, at most "
        f"{MAX_IMAGE_BYTES // 2**20} MiB and {MAX_PIXELS} pixels",
    ),
]
SAEId = Annotated[
    str, Field(min_length=1, max_length=64, description="the id of a served SAE (GET /v1/saes)")
]
Label = Annotated[str, Field(min_length=1, max_length=200)]
TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K, description="latents returned per input")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Health(BaseModel):
    status: Literal["ok"]


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong with the request, or why the server cannot answer")


class ValidationErrorResponse(BaseModel):
    detail: list[dict] = Field(description="FastAPI's list of the request fields that failed validation")


class SAEInfo(BaseModel):
    id: str
    hook_point: str
    text_hook_point: str | None = Field(description="where it reads captions; null: images only")
    architecture: str
    d_in: int
    n_latents: int
    has_catalog: bool


class SAEList(BaseModel):
    saes: list[SAEInfo]


class LatentSummary(BaseModel):
    latent: int
    name: str | None = Field(description="its concept from the catalog; null where unnamed")
    runner_up: str | None
    confidence: float | None = Field(description="probability that the name is right")
    ms: float | None = Field(description="Monosemanticity Score (Pach et al.)")
    firing_density: float | None = Field(description="share of the labelled rows it fires on")
    heldout_auroc: float | None = Field(description="how well the name predicts where it fires (0.5: chance)")
    steerability: float | None = Field(description="the steer job's flip rate x hold rate")


class LatentPage(BaseModel):
    sae: str
    total: int = Field(description="latents matching the query")
    latents: list[LatentSummary]


class TopImage(BaseModel):
    source_id: str
    activation: float
    url: str = Field(description="GET it (with the API key) for the image as PNG")


class TopCaption(BaseModel):
    caption: str
    activation: float


class Histogram(BaseModel):
    edges: list[float]
    counts: list[int]


class LatentEntry(LatentSummary):
    sae: str
    similarity: float | None
    naming: str | None
    firing_count: int | None
    top_images: list[TopImage]
    top_captions: list[TopCaption]
    histogram: Histogram | None = Field(description="its positive activations over the labelled rows")


class Concept(BaseModel):
    latent: int
    activation: float
    name: str | None
    confidence: float | None


class PatchMap(BaseModel):
    latent: int
    grid: list[int] = Field(description="[rows, columns] of image patches")
    values: list[float] = Field(description="the latent's activation on each patch, row-major")


class EncodeRequest(Strict):
    sae: SAEId
    images: list[Base64Image] = Field(min_length=1, max_length=MAX_IMAGES)
    top_k: TopK = 10
    map_latent: int | None = Field(None, ge=0, description="also return this latent's map over image patches")


class EncodeResult(BaseModel):
    latents: list[Concept] = Field(description="the image's largest active latents, largest first")
    map: PatchMap | None


class EncodeResponse(BaseModel):
    sae: str
    hook_point: str
    results: list[EncodeResult] = Field(description="one per image, in request order")


class InterpretRequest(Strict):
    sae: SAEId
    image: Base64Image | None = None
    caption: str | None = Field(None, min_length=1, max_length=2000)
    top_k: TopK = 10


class PairConcept(BaseModel):
    latent: int
    name: str | None
    confidence: float | None
    image_activation: float
    text_activation: float


class InterpretResponse(BaseModel):
    sae: str
    image: list[Concept] | None = Field(description="the image's named concepts, largest first")
    caption: list[Concept] | None = Field(description="the caption's named concepts, largest first")
    shared: list[PairConcept] | None = Field(description="with both: concepts active on both sides")
    image_only: list[PairConcept] | None
    text_only: list[PairConcept] | None


class SteerEdit(Strict):
    latent: int = Field(ge=0)
    op: Literal["set", "add", "scale", "ablate"] = "set"
    value: float | None = Field(None, ge=-1e6, le=1e6, description="not used by ablate")


class SteerRequest(Strict):
    sae: SAEId
    image: Base64Image
    edits: list[SteerEdit] = Field(min_length=1, max_length=MAX_EDITS)
    strength: Literal["relative", "absolute"] = Field(
        "relative",
        description="relative: set and add values are multiples of the latent's largest activation",
    )
    labels: list[Label] | None = Field(None, max_length=MAX_LABELS, description="CLIP: zero-shot over these")
    question: str | None = Field(
        None, min_length=1, max_length=500, description="LLaVA: the question to answer"
    )
    mode: Literal["delta", "reconstruction"] = "delta"
    tokens: Literal["all", "cls", "patches"] = "all"


class LabelProbability(BaseModel):
    label: str
    probability: float


class ModelOutput(BaseModel):
    answer: str | None = Field(description="LLaVA's answer")
    labels: list[LabelProbability] | None = Field(description="CLIP's zero-shot probabilities")


class SteerResponse(BaseModel):
    sae: str
    default: ModelOutput
    steered: ModelOutput


Share = Annotated[float, Field(ge=0, le=1)]


class MitigateRequest(Strict):
    sae: SAEId
    image: Base64Image
    question: str = Field(min_length=1, max_length=500, description="the question LLaVA answers")
    alpha: Share = Field(0.8, description="how far the text mean moves to its concept-mixed reconstruction")
    beta: Share = Field(0.9, description="how far the text concepts are mixed toward the image's")
    cd_alpha: Share = Field(0.6, description="weight of the mitigated logits in contrastive decoding")
    cd_beta: float = Field(
        0.8, gt=0, le=1, description="tokens kept: plain probability at least this share of the best's"
    )


class MitigateResponse(BaseModel):
    sae: str
    default: str = Field(description="LLaVA's plain greedy answer")
    mitigated: str = Field(description="its answer with concept mixing and contrastive decoding")
