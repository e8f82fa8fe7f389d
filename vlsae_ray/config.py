"""Every job's YAML config as a pydantic model, and the one loader that reads them.

An unknown key or a bad value fails in `load_config`, before any work starts, with a message
naming the key, what was given and the expected form.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from vlsae_ray import storage
from vlsae_ray.sae import BaseSAEConfig, SAEConfig
from vlsae_ray.sae import parse_config as parse_sae_config


class ConfigError(ValueError):
    """A config file that cannot be used as written."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _whole_above_one(gpus: float) -> float:
    if gpus > 1 and gpus != int(gpus):
        raise ValueError(
            "Ray shares a GPU only in fractions below 1: give a fraction below 1 or a whole number"
        )
    return gpus


# Where a job's models run (see `vlsae_ray.devices`): decided from the Ray cluster, not the driver.
Device = Literal["auto", "cpu", "cuda"]
DEVICE_HELP = (
    "auto: a GPU when the Ray cluster has one (CPU otherwise, said once in the log); cuda: a GPU always "
    "(an error before launch on a cluster with none); cpu: never a GPU"
)
# GPUs per actor, task or replica when it runs on GPU: a fraction below 1 shares a GPU
GPUs = Annotated[float, Field(gt=0), AfterValidator(_whole_above_one)]


class SourceConfig(Strict):
    """Where the images and captions come from.

    File sources (webdataset, parquet, folder) are read through `vlsae_ray.storage`, so each URI
    is a local path, file:// or s3://. A `{000..099}` range in a URI expands to one URI per number,
    as in webdataset (`shards/train-{0000..0127}.tar`); then `*` and `?` globs expand to the
    matching files and folders, sorted (`s3://bucket/laion/*.tar`).
    """

    kind: Literal["world", "package_photos", "webdataset", "parquet", "folder"] = Field(
        "world",
        description="world: the built-in concept world (images with known shapes, colours, ...); "
        "package_photos: real photos shipped inside scikit-image, scikit-learn and matplotlib, with "
        "seeded random crops and flips; webdataset: .tar shards of samples grouped by basename "
        "(KEY.jpg/.png/.webp image, KEY.txt caption); parquet: files with an image-bytes column and a "
        "caption column; folder: image files and a captions file in the same folder",
    )
    uris: list[str] = Field(
        [],
        description="webdataset: .tar URIs; parquet: .parquet URIs; folder: folder URIs (each with its "
        "captions file); in this order, which fixes every item's shard",
    )
    n_items: int | None = Field(
        None,
        gt=0,
        description="world and package_photos: how many items to make (default 2048); file sources: "
        "use only the first n_items items (default all)",
    )
    seed: int = Field(0, description="world and package_photos: seed of the items")
    split: Literal["train", "test"] = Field(
        "train", description="world only: train, or test (the held-out shape-colour pairs)"
    )
    image_column: str = Field("image", description="parquet: column of encoded image bytes")
    caption_column: str = Field("caption", description="parquet: column of captions")
    captions: str = Field(
        "captions.jsonl",
        description='folder: captions file in each folder: .jsonl lines {"file": NAME, "caption": TEXT} '
        "or .csv with columns file,caption",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_size(cls, value: object) -> object:
        # a generated source's default size, written out so that a manifest records it
        generated = isinstance(value, dict) and value.get("kind", "world") in ("world", "package_photos")
        if generated and value.get("n_items") is None:
            return {**value, "n_items": 2048}
        return value

    @model_validator(mode="after")
    def _check_kind(self) -> SourceConfig:
        generated = self.kind in ("world", "package_photos")
        if generated and self.uris:
            raise ValueError(f"source.uris is for file sources; kind {self.kind!r} makes its own items")
        if not generated and not self.uris:
            raise ValueError(f"source kind {self.kind!r} needs source.uris: the {self.kind} URIs to read")
        return self


class BackboneConfig(Strict):
    """The vision-language model whose activations we read."""

    library: Literal["open_clip", "transformers", "llava"] = Field(
        "open_clip",
        description="open_clip: an open_clip model; transformers: a transformers CLIPModel; "
        "llava: a transformers LlavaForConditionalGeneration",
    )
    model: str = Field(
        description="open_clip: model name (e.g. ViT-B-32 or the built-in world-clip); transformers and "
        "llava: a folder (path, file:// or s3:// URI) holding the model's save_pretrained files, with its "
        "image processor and tokenizer saved beside it; an s3:// folder is downloaded once per machine "
        "into $VLSAE_CACHE (default ~/.cache/vlsae)"
    )
    pretrained: str | None = Field(
        None,
        description="open_clip only: pretrained tag, or a checkpoint file as a path, file:// or s3:// URI",
    )
    device: Device = Field(
        "auto",
        description=f"{DEVICE_HELP}; in a job's actors and replicas. Outside Ray (notebooks, the driver's "
        "own models): auto is cuda when this process sees a GPU",
    )


class TokenConfig(Strict):
    """Which rows a sequence output (a [tokens, d] block output) contributes per item."""

    mode: Literal["cls", "random", "mean", "all"] = Field(
        "cls",
        description="cls: the class token (the EOT token for text); random: `k` tokens drawn per item, "
        "seeded by `seed` and the item id; mean: the mean over tokens; all: every token",
    )
    k: int = Field(
        1, gt=0, description="random mode: tokens drawn per item (all of its tokens when it has fewer)"
    )
    seed: int = Field(0, description="random mode: seed of the draw")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: object) -> object:
        return {"mode": value} if isinstance(value, str) else value

    def __str__(self) -> str:
        return f"random:{self.k}:{self.seed}" if self.mode == "random" else self.mode


class ExtractConfig(Strict):
    source: SourceConfig = SourceConfig()
    backbone: BackboneConfig
    hook_points: list[str] = Field(
        min_length=1,
        description="module names in the model, e.g. visual.transformer.resblocks.3 (that block's output "
        "residual stream) or visual (the image embedding); one activation dataset each",
    )
    token: TokenConfig = Field(TokenConfig(), description="which tokens of a sequence output become rows")
    output: str = Field(description="URI under which each hook point's dataset is written")
    shard_rows: int = Field(
        1024,
        gt=0,
        description="items per shard (a shard holds each item's rows: one with token cls or mean, k with "
        "random, every token with all); one shard's images travel together, so keep it in the thousands",
    )
    batch_size: int = Field(64, gt=0, description="items per model forward")
    concurrency: int = Field(1, gt=0, description="model actors")
    gpus_per_actor: GPUs = Field(
        1.0, description="GPUs each model actor requests when on GPU (backbone.device); below 1 shares one"
    )
    cpu_threads: int | None = Field(
        None,
        gt=0,
        description="torch threads of a model actor on CPU; None: its node's CPUs / concurrency",
    )
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    fail_fast: bool = Field(
        False,
        description="false: count, log and skip bad input (corrupt images, missing captions a text hook "
        "needs, unreadable source files); true: stop at the first one",
    )


# The trainer's arithmetic (`train.step.SAETrainer`): fp32 master weights, gradients and Adam in every
# mode. fp32: fp32 products. tf32: fp32 with TF32 tensor-core matmuls on CUDA (plain fp32 on CPU).
# bf16: the forward under torch.autocast(bfloat16): bf16 encoder GEMM, selection and decode products.
Precision = Literal["fp32", "tf32", "bf16"]


class TrainingConfig(Strict):
    batch_size: int = Field(1024, gt=0, description="global batch size (split across data-parallel workers)")
    epochs: int = Field(1, gt=0)
    seed: int = 0
    lr: float | None = Field(
        None, gt=0, description="None: train.step.default_lr (2e-4 / sqrt(n_latents / 2**14), more if short)"
    )
    num_workers: int = Field(2, gt=0, description="Ray Train workers: data_parallel x latent_shards")
    latent_shards: int = Field(
        1,
        gt=0,
        description="workers that split one SAE's latents between them (topk and batchtopk); "
        "num_workers / latent_shards groups train on different data",
    )
    window_shards: int = Field(
        4, gt=0, description="activation shards whose rows are shuffled together (the shuffle window)"
    )
    read_tasks: int = Field(
        2, gt=0, description="windows each data-parallel part reads at once, ahead of training (Ray Data)"
    )
    checkpoint_every: int | None = Field(
        None, gt=0, description="steps between checkpoints under OUTPUT/checkpoints (None: none)"
    )
    keep_checkpoints: int = Field(2, gt=0, description="most recent checkpoints kept")
    max_failures: int = Field(
        0, ge=0, description="worker failures Ray Train recovers from (restarting from the last checkpoint)"
    )
    cpus_per_worker: float = Field(
        0.5, gt=0, description="below 1 on small machines, so other tasks can run beside them"
    )
    use_gpu: bool = False
    zero_stage: Literal[1, 2] | None = Field(
        None,
        description="DeepSpeed ZeRO over the data-parallel workers: 1 partitions Adam's state, 2 also the "
        "gradients; None: DistributedDataParallel",
    )
    precision: Precision = Field(
        "fp32",
        description="fp32; tf32: TF32 matmuls on CUDA; bf16: mixed precision, the forward's encoder GEMM, "
        "top-k selection and decode in bf16 (fp32 accumulation), fp32 master weights, gradients, Adam, loss",
    )

    @model_validator(mode="after")
    def _check_layout(self) -> TrainingConfig:
        if self.zero_stage and self.latent_shards > 1:
            raise ValueError("zero_stage runs on data-parallel workers only: set latent_shards: 1 or drop it")
        if self.num_workers % self.latent_shards:
            raise ValueError(
                f"num_workers={self.num_workers} must be a multiple of latent_shards={self.latent_shards}"
            )
        if self.batch_size % (self.num_workers // self.latent_shards):
            raise ValueError(
                f"batch_size={self.batch_size} must split evenly over the "
                f"{self.num_workers // self.latent_shards} data-parallel groups"
            )
        return self


class AlignerTrainingConfig(Strict):
    """The LLaVA aligner trained before the VL-SAE (`vlsae_ray.sae.aligner`), on the same paired
    datasets, with `training`'s workers and seed; the VL-SAE then trains on its projections.

    Defaults are the VL-SAE authors' (`train_aux.py`); a small dataset needs a smaller batch and a
    larger rate (the world LLaVA's config uses batch 256 and lr 1e-3).
    """

    d_proj: int | None = Field(
        None, gt=0, description="width of the projections (the VL-SAE's d_in); None: the hidden states' width"
    )
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature")
    batch_size: int = Field(2048, gt=0, description="global batch of image-caption pairs")
    epochs: int = Field(50, gt=0)
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate, cosine-annealed to 0 over the run")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")


class TrainConfig(Strict):
    activations: str = Field(
        description="URI of an activation dataset (a folder with manifest.json); for a VL-SAE the image side"
    )
    text_activations: str | None = Field(
        None,
        description="VL-SAE only: URI of the text-side dataset (caption rows, e.g. hook point `text`); "
        "each step then trains on batch_size image rows and batch_size text rows. None: a vl_sae "
        "learns the image side only",
    )
    paired: bool = Field(
        True,
        description="text_activations holds the same items as activations, one row per item in the same "
        "shards (one extraction job with both hook points; checked before launch), so each batch holds "
        "image-caption pairs; false: two independent datasets",
    )
    aligner: AlignerTrainingConfig | None = Field(
        None,
        description="LLaVA hidden states: first train the VL-SAE authors' aligner on the paired datasets "
        "(saved to OUTPUT/aligner), project both to OUTPUT/aligned/{image,text}, and train the VL-SAE on "
        "the projections; None: the VL-SAE trains on the datasets as they are",
    )
    sae: SAEConfig
    sweep: list[dict[str, Any]] = Field(
        [],
        description="a sweep: each entry overrides keys of `sae` (e.g. {k: 32} or {architecture: "
        "batchtopk}); every SAE of the sweep trains on the same batches, read once, into OUTPUT/sweep-NN",
    )
    training: TrainingConfig = TrainingConfig()
    output: str = Field(description="URI of the folder the trained SAE (or the sweep's SAEs) is saved to")

    @model_validator(mode="after")
    def _check_sweep(self) -> TrainConfig:
        runs = self.sae_runs()  # every entry of the sweep is a valid SAE config
        if self.text_activations is not None:
            for i, (_, sae) in enumerate(runs):
                if sae.architecture != "vl_sae":
                    where = f"sweep[{i}]" if self.sweep else "sae"
                    raise ValueError(
                        f"text_activations is for a VL-SAE, but {where} has architecture "
                        f"{sae.architecture!r}: remove text_activations or set architecture: vl_sae"
                    )
        if self.aligner is not None:
            if self.text_activations is None or not self.paired:
                raise ValueError(
                    "aligner needs paired image and text datasets: set text_activations, paired: true"
                )
            d_proj = self.aligner.d_proj
            for i, (_, sae) in enumerate(runs):
                if d_proj is not None and sae.d_in != d_proj:
                    where = f"sweep[{i}]" if self.sweep else "sae"
                    raise ValueError(
                        f"{where} has d_in={sae.d_in}, but the aligner projects to d_proj={d_proj}"
                    )
        return self

    def sae_runs(self) -> list[tuple[str, BaseSAEConfig]]:
        """(output URI, SAE config) of each SAE the job trains."""
        if not self.sweep:
            return [(self.output, self.sae)]
        runs = []
        for i, override in enumerate(self.sweep):
            try:
                sae = parse_sae_config({**self.sae.model_dump(), **override})
            except ValidationError as error:
                raise ValueError(f"sweep[{i}] = {override}: {_explain(error).strip()}") from None
            runs.append((storage.join(self.output, f"sweep-{i:02d}"), sae))
        return runs


class ZeroShotConfig(Strict):
    """The evaluate job's downstream task: zero-shot accuracy with the SAE spliced into the backbone,
    and, for a VL-SAE on the CLIP's image embedding (hook point `visual`), concept-level zero-shot
    (`vlsae_ray.eval.concept_zeroshot`) with alpha chosen on validation images."""

    task: Literal["world", "files"] = Field(
        "world",
        description="world: zero-shot classification of every concept-world attribute; files: your "
        "labelled images (`images`, `classes`)",
    )
    backbone: BackboneConfig = Field(description="the open_clip CLIP the SAE's activations came from")
    hook_point: str | None = Field(
        None, description="where the SAE's reconstruction replaces the activation; default: the dataset's"
    )
    n_items: int = Field(1000, gt=0, description="world: test items classified")
    attributes: list[str] | None = Field(
        None, description="world attributes classified (e.g. [shape, colour]); default: all of them"
    )
    split: Literal["train", "test"] = Field("test", description="world split (test: held-out pairs)")
    seed: int = Field(0, description="world: seed of the test items")
    validation_items: int = Field(
        500,
        gt=0,
        description="world: validation items (same split, seed `validation_seed`) alpha is chosen on",
    )
    validation_seed: int = Field(1000, description="world: seed of the validation items; not `seed`")
    images: str | None = Field(
        None,
        description="files: URI of a folder with one subfolder of images per class (named as in `classes`), "
        "or of a .parquet file with `image_column` and `label_column`",
    )
    classes: str | None = Field(
        None, description="files: URI of a text file of class names, one per line (class i is line i)"
    )
    image_column: str = Field("image", description="files, parquet: column of encoded image bytes")
    label_column: str = Field(
        "label", description="files, parquet: column of each row's class name or 0-based class index"
    )
    templates: list[str] = Field(
        ["a photo of a {}.", "a photo of the {}.", "an image of a {}.", "{}"],
        min_length=1,
        description="files: prompt templates, each with one {} for the class name; a class's embedding is "
        "the normalised mean over its prompts",
    )
    validation_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="files: share of the images (by a hash of their id) alpha is chosen on; the rest are "
        "the test images",
    )
    alphas: list[float] = Field(
        [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0],
        min_length=1,
        description="concept-level weights tried on the validation images (VL-SAE on `visual` only)",
    )
    batch_size: int = Field(256, gt=0, description="images per forward")

    @model_validator(mode="after")
    def _check_task(self) -> ZeroShotConfig:
        files = {"images": self.images, "classes": self.classes}
        if self.task == "files" and None in files.values():
            missing = [key for key, value in files.items() if value is None]
            raise ValueError(f"zero_shot task files needs {' and '.join(missing)}: see the config reference")
        if self.task == "world" and any(files.values()):
            raise ValueError("images and classes are for task files; the world task makes its own images")
        if self.task == "world" and self.validation_seed == self.seed:
            raise ValueError(
                f"validation_seed={self.validation_seed} equals seed: alpha would be chosen on the test items"
            )
        for template in self.templates:
            if template.count("{}") != 1:
                raise ValueError(
                    f"template {template!r} must hold exactly one {{}} where the class name goes"
                )
        if any(alpha < 0 for alpha in self.alphas):
            raise ValueError(f"alphas {self.alphas} must all be at least 0")
        return self


class SAETasksConfig(Strict):
    """Where a job's Ray tasks run their SAE forwards (evaluate, label)."""

    device: Device = Field("auto", description=f"the Ray tasks' SAE forwards: {DEVICE_HELP}")
    gpus_per_task: GPUs = Field(
        0.25,
        description="GPUs of each Ray task when on GPU: tasks read shards as much as they compute, so by "
        "default four share a GPU; 1 for an SAE that fills one",
    )


class EvaluateConfig(SAETasksConfig):
    """The evaluate job: FVU, L0, dead latents, MS, uniqueness, downstream checks and a report."""

    sae: str = Field(description="URI of a saved SAE (the one the MS, uniqueness and plots describe)")
    activations: str = Field(description="URI of the activation dataset to evaluate on")
    embeddings: str | None = Field(
        None,
        description="URI of an image-embedding dataset over the same items, row for row, for the "
        "Monosemanticity Score: any extracted image embedding, e.g. hook point `visual` of a CLIP",
    )
    checkpoints: list[str] = Field(
        [], description="more SAE URIs on the same activations: FVU and L0 of each, drawn with `sae`"
    )
    text_activations: str | None = Field(
        None,
        description="VL-SAE only: URI of the text-side dataset of the same items (caption rows), for the "
        "intra- and inter-concept image/text similarity",
    )
    zero_shot: ZeroShotConfig | None = Field(
        None, description="downstream zero-shot task with the SAE spliced in; none: skipped"
    )
    top_k: int = Field(9, gt=0, description="top images per latent (uniqueness, grids, VL-SAE similarity)")
    grid_latents: int = Field(6, ge=0, description="highest-MS latents shown as top-image grids")
    batch_size: int = Field(1024, gt=0, description="rows per SAE forward")
    shards_per_task: int = Field(4, gt=0, description="shards each Ray task reduces to one partial")
    cpus_per_task: float = Field(
        1.0, gt=0, description="CPUs of each Ray task on CPU (a task on GPU takes one, as Ray Data's do)"
    )
    output: str = Field(description="URI of the folder the report is written to")


class LabelConfig(SAETasksConfig):
    """The label job: each latent's top examples and name, written to the concept catalog."""

    sae: str = Field(description="URI of a saved SAE")
    activations: str = Field(description="URI of the activation dataset to search (for a VL-SAE: images)")
    text_activations: str | None = Field(
        None, description="VL-SAE only: URI of the text-side dataset of the same items, for top captions"
    )
    embeddings: str | None = Field(
        None,
        description="URI of an image-embedding dataset over the same items (e.g. hook `visual`), for "
        "naming by top images",
    )
    naming: Literal["auto", "activations", "clip_dissect", "top_images", "decoder", "none"] = Field(
        "auto",
        description="activations: the concept the images a latent fires on share beyond chance, each "
        "image weighted by its activation over the whole dataset (calibrated confidence, unnamed when "
        "unsure); clip_dissect: "
        "CLIP-Dissect's SoftWPMI over its top images; top_images: the mean embedding of its top images; "
        "these need `embeddings`. decoder: its decoder direction (only for an SAE trained on the "
        "embedding itself, e.g. hook `visual`); none: no names; auto: activations when `embeddings` is "
        "set, else none",
    )
    vocabulary: str | None = Field(
        None,
        description="URI of a text file of concepts, one per line, each `#` line starting a block of "
        "alternatives (colours, shapes, ...); default: the packaged vocabulary; `world`: the concept "
        "world's concepts alone",
    )
    heldout_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="share of the items (by a hash of their id) kept out of naming, on which each name's "
        "held-out AUROC is measured",
    )
    min_confidence: float = Field(
        0.5,
        ge=0,
        le=1,
        description="naming activations: a latent whose best concept has a lower calibrated confidence "
        "stays unnamed (name null)",
    )
    prompts: list[str] = Field(
        ["a photo of {}.", "an image showing {}.", "{}"],
        min_length=1,
        description="prompt templates, each with one {} for the concept; a concept's text embedding is "
        "the mean over its prompts",
    )
    text_model: BackboneConfig | None = Field(
        None,
        description="the CLIP whose text tower embeds the vocabulary; default: the model that made the "
        "embeddings (the built-in world CLIP is found by name; name any other here)",
    )
    top_k: int = Field(9, gt=0, description="top-activating examples kept per latent")
    batch_size: int = Field(1024, gt=0, description="rows per SAE forward")
    output: str = Field(description="URI of the folder the catalog is written to")

    @model_validator(mode="after")
    def _check_naming(self) -> LabelConfig:
        if self.naming in ("activations", "clip_dissect", "top_images") and self.embeddings is None:
            raise ValueError(f"naming {self.naming!r} needs `embeddings`: an image-embedding dataset URI")
        for prompt in self.prompts:
            if prompt.count("{}") != 1:
                raise ValueError(f"prompt {prompt!r} must hold exactly one {{}} where the concept goes")
        return self

    @property
    def naming_method(self) -> str:
        if self.naming == "auto":
            return "activations" if self.embeddings is not None else "none"
        return self.naming


class SteerConfig(Strict):
    """The steer job: clamp each concept latent of the catalog inside the backbone and measure, on
    the concept world's ground truth, how often the prediction of its attribute flips to its value."""

    sae: str = Field(description="URI of a saved SAE, trained at `hook_point` of the backbone")
    catalog: str = Field(
        description="URI of the label job's catalog.parquet for that SAE: a concept latent is one whose top "
        "images all share one attribute value; its steerability is written back into this catalog"
    )
    backbone: BackboneConfig = Field(
        description="the model steered: an open_clip CLIP (predictions: zero-shot over every attribute) or a "
        "LLaVA folder (predictions: its answers to the world's questions), e.g. the world CLIP or world LLaVA"
    )
    hook_point: str = Field(
        description="the module whose output is steered, e.g. visual.transformer.resblocks.2 (open_clip) or "
        "model.vision_tower.encoder.layers.2 (LLaVA's vision_feature_layer=-2 for the world LLaVA)"
    )
    tokens: Literal["all", "cls", "patches"] = Field(
        "all", description="tokens edited: all (Pach et al.), cls, or patches (all but the class token)"
    )
    modes: list[Literal["delta", "reconstruction"]] = Field(
        ["delta", "reconstruction"],
        min_length=1,
        description="delta: h + decode(z') - decode(z) (the error term kept); reconstruction: decode(z') "
        "(Pach et al.)",
    )
    strengths: list[float] = Field(
        [0.5, 1.0, 2.0, 4.0, 8.0],
        min_length=1,
        description="clamp values, in multiples of each latent's maximum activation (the catalog's top one)",
    )
    swap: bool = Field(
        False,
        description="also ablate the other concept latents of the same attribute (e.g. every other colour)",
    )
    n_images: int = Field(16, gt=0, description="held-out images per latent, each lacking the latent's value")
    max_latents: int | None = Field(
        None, gt=0, description="concept latents measured, spread over concepts; None: all of them"
    )
    min_images: int = Field(
        4, gt=0, description="distinct top images a latent needs to count as a concept latent"
    )
    split: Literal["train", "test"] = Field("test", description="world split of the images (test: held out)")
    seed: int = 0
    batch_size: int = Field(64, gt=0, description="(latent, image) pairs per model forward")
    concurrency: int = Field(1, gt=0, description="model actors")
    gpus_per_actor: GPUs = Field(
        1.0, description="GPUs each model actor requests when on GPU (backbone.device)"
    )
    output: str = Field(description="URI of the folder steering.json and the report are written to")

    @model_validator(mode="after")
    def _check_strengths(self) -> SteerConfig:
        if any(s <= 0 for s in self.strengths):
            raise ValueError(f"strengths {self.strengths} must all be positive multiples of a maximum")
        return self


class ServeAutoscalingConfig(Strict):
    """Ray Serve replica autoscaling (`autoscaling_config`); the Ray autoscaler adds nodes to fit."""

    min_replicas: int = Field(
        1, ge=0, description="replicas kept warm; 0 lets an idle API give back its GPUs (cold starts)"
    )
    max_replicas: int = Field(gt=0, description="the most replicas, each with gpus_per_replica GPUs")
    target_ongoing_requests: float = Field(
        16,
        gt=0,
        description="requests per replica Serve scales toward; about one batch of the encoder (16)",
    )
    upscale_delay_s: float = Field(30, ge=0, description="load held this long before a replica is added")
    downscale_delay_s: float = Field(
        600, ge=0, description="low load held this long before a replica is removed (loading one is slow)"
    )

    @model_validator(mode="after")
    def _check_range(self) -> ServeAutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}")
        return self


class ServedSAEConfig(Strict):
    """One SAE the API serves, with what the label and evaluate jobs wrote about its latents."""

    sae: str = Field(description="URI of a saved SAE")
    hook_point: str = Field(description="the backbone hook point the SAE reads images at")
    token: TokenConfig = Field(TokenConfig(), description="the image's row at the hook point: cls or mean")
    text_hook_point: str | None = Field(
        None, description="where it reads captions (a VL-SAE, e.g. text); None: images only"
    )
    catalog: str | None = Field(None, description="URI of the label job's catalog.parquet: names, top images")
    monosemanticity: str | None = Field(
        None, description="URI of the evaluate job's monosemanticity.json: each latent's MS"
    )
    aligner: str | None = Field(
        None,
        description="URI of the aligner a LLaVA VL-SAE was trained behind (the train job's OUTPUT/aligner): "
        "the SAE reads its projections, and POST /v1/mitigate uses both",
    )

    @model_validator(mode="after")
    def _check_token(self) -> ServedSAEConfig:
        if self.token.mode not in ("cls", "mean"):
            raise ValueError(f"token must be cls or mean (one row per image), not {str(self.token)!r}")
        return self


class ServeConfig(Strict):
    backbone: BackboneConfig
    saes: dict[
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")], ServedSAEConfig
    ] = Field(min_length=1, description="the SAEs served, by the id requests name them with")
    max_loaded_saes: int = Field(
        4, gt=0, description="SAEs a replica holds at once (least recently used unloaded first)"
    )
    top_k: int = Field(10, gt=0, le=256, description="latents returned per image unless a request says")
    host: str = Field("127.0.0.1", description="address the HTTP proxy binds; another address needs API keys")
    port: int = Field(8000, gt=0, lt=65536)
    api_keys_file: str | None = Field(
        None,
        description="a file of API keys, one per line (e.g. a mounted Kubernetes Secret); keys may "
        "also come from the VLSAE_API_KEYS environment variable (comma-separated). No keys: no "
        "authentication, allowed on a loopback host only",
    )
    num_replicas: int = Field(1, gt=0, description="a fixed number of replicas (without autoscaling)")
    autoscaling: ServeAutoscalingConfig | None = Field(
        None, description="scale the replicas with the load instead of a fixed num_replicas"
    )
    max_batch_size: int = Field(16, gt=0, description="images per batched backbone forward")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    max_ongoing_requests: int = Field(
        32,
        gt=0,
        description="requests a replica takes at once; at least max_batch_size, or batches never fill",
    )
    max_queued_requests: int = Field(
        256, gt=0, description="requests waiting for a replica; past this the API answers 503 + Retry-After"
    )
    gpus_per_replica: GPUs = Field(
        1.0, description="GPUs each replica requests when on GPU (backbone.device); below 1 shares one"
    )
    cpus_per_replica: float = Field(
        1.0,
        gt=0,
        description="CPUs each replica reserves; on CPU its torch threads too (the whole number of them, "
        "at least 1), as Ray sets OMP_NUM_THREADS from it",
    )

    @model_validator(mode="after")
    def _check_replicas(self) -> ServeConfig:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("give num_replicas or autoscaling, not both")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests={self.max_ongoing_requests} is below max_batch_size="
                f"{self.max_batch_size}: batches would never fill"
            )
        return self


JobConfig = TypeVar("JobConfig", bound=BaseModel)


def load_config(uri: str, model: type[JobConfig]) -> JobConfig:
    """Read the YAML file at `uri` (path, file:// or s3://) and validate it as `model`."""
    try:
        raw = yaml.safe_load(storage.read_text(uri))
    except FileNotFoundError as error:
        raise ConfigError(f"config file {uri!r} does not exist") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {uri!r} is not valid YAML: {error}") from error
    return parse_config(raw, model, source=uri)


def parse_config(raw: object, model: type[JobConfig], source: str = "config") -> JobConfig:
    """Validate a plain mapping as `model`, with errors that name each bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: invalid {model.__name__}:\n{_explain(error)}") from None


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check its spelling against the config reference)")
        elif item["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)
