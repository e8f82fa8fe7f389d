"""The library behind the HTTP API (`serve/app.py`): one backbone and the SAEs served with it.

`Interpreter` holds the backbone; `ServedSAE` is one loaded SAE with its catalog (names, top
images) and MS. Everything a route answers is computed here, so a notebook gets the same answers
in process (the API's tests compare the two).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass

import torch
from PIL import Image, UnidentifiedImageError

from vlsae_ray import storage
from vlsae_ray.backbones import hook_dims, load_backbone, required_inputs
from vlsae_ray.config import BackboneConfig, ServedSAEConfig, TokenConfig
from vlsae_ray.interpret.catalog import catalog_rows, read_catalog
from vlsae_ray.sae import SparseAutoencoder
from vlsae_ray.sae.aligner import Aligner
from vlsae_ray.steer.hook import ABLATE, Edit, steered

ALL_TOKENS = TokenConfig(mode="all")
SORT_KEYS = ("ms", "confidence", "density")


class BadInputError(ValueError):
    """A request the server cannot answer as asked: the message says why (HTTP 400)."""


class TooLargeError(BadInputError):
    """An input past a size limit (HTTP 413)."""


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The RGB image in `data`; its size is checked before its pixels are decoded."""
    if not data:
        raise BadInputError("the image is empty; send an image file (PNG, JPEG, ...)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadInputError("the image is not in a format this server reads (PNG, JPEG, ...)") from None
    width, height = image.size
    if width * height > max_pixels:
        raise TooLargeError(
            f"the image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # known format, corrupt
        raise BadInputError(f"the image cannot be read ({error})") from None
    return image.convert("RGB")


@dataclass
class ServedSAE:
    """One served SAE: weights, catalog rows by latent, and each latent's MS (None where unknown)."""

    id: str
    config: ServedSAEConfig
    sae: SparseAutoencoder
    entries: dict[int, dict]
    ms: list[float | None] | None
    rows: int | None  # activation rows the catalog's label run read: the firing density's denominator
    aligner: Aligner | None = None  # a LLaVA VL-SAE's: the SAE reads its projections

    def codes(self, x_bd: torch.Tensor, modality: str = "vision") -> torch.Tensor:
        """[B, n_latents]: the SAE's codes of hook-point rows (through the aligner's projection if any)."""
        return self.sae.encode(self.sae_input(x_bd, modality))

    def sae_input(self, x_bd: torch.Tensor, modality: str = "vision") -> torch.Tensor:
        return x_bd if self.aligner is None else self.aligner.project(x_bd, modality)

    @property
    def n_latents(self) -> int:
        return self.sae.config.n_latents

    def check_latent(self, latent: int) -> None:
        if not 0 <= latent < self.n_latents:
            raise BadInputError(
                f"latent {latent} is not in SAE {self.id!r} (it has {self.n_latents} latents)"
            )

    def summary(self, latent: int) -> dict:
        """The latent's name, confidence, MS, firing density and steerability (None where unknown)."""
        entry = self.entries.get(latent, {})
        count = entry.get("firing_count")
        ms = self.ms[latent] if self.ms is not None else None
        return {
            "latent": latent,
            "name": entry.get("name"),
            "runner_up": entry.get("runner_up"),
            "confidence": entry.get("confidence"),
            "ms": None if ms is None or math.isnan(ms) else ms,
            "firing_density": count / self.rows if count is not None and self.rows else None,
            "heldout_auroc": entry.get("heldout_auroc"),
            "steerability": entry.get("steerability"),
        }

    def entry(self, latent: int) -> dict:
        """The latent's whole catalog entry: the summary, its top images, top captions, histogram."""
        self.check_latent(latent)
        entry = self.entries.get(latent, {})
        images = zip(entry.get("top_source_ids") or [], entry.get("top_activations") or [], strict=True)
        captions = zip(
            entry.get("top_captions") or [], entry.get("top_caption_activations") or [], strict=True
        )
        edges, counts = entry.get("histogram_edges"), entry.get("histogram_counts")
        return self.summary(latent) | {
            "similarity": entry.get("similarity"),
            "naming": entry.get("naming"),
            "firing_count": entry.get("firing_count"),
            "top_images": [{"source_id": s, "activation": a} for s, a in images],
            "top_captions": [{"caption": c, "activation": a} for c, a in captions],
            "histogram": {"edges": edges, "counts": counts} if edges and counts else None,
        }

    def search(self, query: str | None, sort: str, limit: int, offset: int) -> tuple[int, list[dict]]:
        """(matches, one page of them): latents whose name or runner-up contains `query`
        (case-insensitive; no query: every latent that fired), those whose name contains it first,
        then best first by `sort`."""
        key = {"ms": "ms", "confidence": "confidence", "density": "firing_density"}[sort]
        needle = (query or "").strip().lower()
        found = []
        for latent, entry in self.entries.items():
            in_name = needle in (entry.get("name") or "").lower()
            in_runner_up = needle in (entry.get("runner_up") or "").lower()
            if (needle and (in_name or in_runner_up)) or (not needle and entry.get("firing_count")):
                found.append((not in_name, self.summary(latent)))

        def rank(match: tuple[bool, dict]) -> tuple:
            runner_up_only, summary = match
            return runner_up_only, summary[key] is None, -(summary[key] or 0.0), summary["latent"]

        found.sort(key=rank)
        return len(found), [summary for _, summary in found[offset : offset + limit]]

    def max_activation(self, latent: int) -> float:
        """The latent's largest activation in the catalog: the unit of relative strengths."""
        top = self.entries.get(latent, {}).get("top_activations")
        if not top:
            raise BadInputError(
                f"latent {latent} of SAE {self.id!r} has no maximum activation in its catalog (it never "
                "fired, or no catalog is served): give an absolute strength"
            )
        return top[0]


def load_served_sae(sae_id: str, config: ServedSAEConfig, device: torch.device) -> ServedSAE:
    sae = SparseAutoencoder.load(config.sae, device=device).eval()
    entries, rows = {}, None
    if config.catalog is not None:
        table = read_catalog(config.catalog)
        entries = {row["latent"]: row for row in table.to_pylist()}
        rows = catalog_rows(table)
    ms = None
    if config.monosemanticity is not None:
        ms = json.loads(storage.read_text(config.monosemanticity))["latents"]
    aligner = None if config.aligner is None else Aligner.load(config.aligner, device=device)
    return ServedSAE(sae_id, config, sae, entries, ms, rows, aligner)


def _edit(op: str, value: float | None) -> Edit | float:
    return {"set": value, "add": Edit("add", value), "scale": Edit("scale", value), "ablate": ABLATE}[op]


class Interpreter:
    """A backbone on `device`: images and captions to named SAE concepts, patch maps, steering."""

    def __init__(self, config: BackboneConfig, device: torch.device | None = None):
        self.backbone = load_backbone(config, device)
        self.device = self.backbone.device
        self.llava = config.library == "llava"
        self.processor = None
        if self.llava:
            from vlsae_ray.backbones.llava import load_processor

            self.processor = load_processor(config)

    def load(self, sae_id: str, config: ServedSAEConfig) -> ServedSAE:
        """Load an SAE, checked against the backbone's hook points and widths."""
        for hook, reads in ((config.hook_point, "image"), (config.text_hook_point, "text")):
            if hook is not None and self.backbone.hook_points.get(hook) != reads:
                raise ValueError(f"SAE {sae_id!r}: {hook!r} is not a hook point that reads {reads}s here")
        served = load_served_sae(sae_id, config, self.device)
        hooks = [h for h in (config.hook_point, config.text_hook_point) if h is not None]
        reads = served.sae.config.d_in if served.aligner is None else served.aligner.config.d_in
        for hook, d in hook_dims(self.backbone.config, hooks).items():
            if d != reads:
                raise ValueError(f"SAE {sae_id!r}: {hook!r} gives d={d} but the SAE takes {reads}")
        if served.aligner is not None and served.aligner.config.d_proj != served.sae.config.d_in:
            raise ValueError(
                f"SAE {sae_id!r} takes d={served.sae.config.d_in} but its aligner projects to "
                f"{served.aligner.config.d_proj}: serve the aligner the SAE was trained behind"
            )
        return served

    def image_rows(self, hook_points: list[str], images: list[Image.Image], token: TokenConfig) -> dict:
        """Rows of images at image hook points. LLaVA's language-model hooks read a caption too: an
        image's positions come before it (causal attention), so an empty one stands in."""
        ids = [str(i) for i in range(len(images))]  # ids only label rows: no random draw here
        pixels = self.backbone.pixels(images)
        texts = [""] * len(images) if "texts" in required_inputs(self.backbone.config, hook_points) else None
        return self.backbone.activations(hook_points, pixels=pixels, texts=texts, item_ids=ids, token=token)

    @torch.no_grad()
    def image_codes(self, requests: list[tuple[ServedSAE, Image.Image]]) -> list[torch.Tensor]:
        """Each (SAE, image)'s latent codes [n_latents], with one backbone forward per token mode:
        requests for different SAEs share it."""
        codes: list[torch.Tensor | None] = [None] * len(requests)
        by_token: dict[str, list[int]] = {}
        for i, (served, _) in enumerate(requests):
            by_token.setdefault(str(served.config.token), []).append(i)
        for indices in by_token.values():
            token = requests[indices[0]][0].config.token
            hooks = sorted({requests[i][0].config.hook_point for i in indices})
            rows = self.image_rows(hooks, [requests[i][1] for i in indices], token)
            for row, i in enumerate(indices):
                served = requests[i][0]
                x_d = rows[served.config.hook_point].values[row]
                # one row at a time: a batch-level SAE (BatchTopK) answers each image as if alone
                codes[i] = served.codes(x_d[None].to(self.device))[0].float().cpu()
        return codes

    def image_vector(self, served: ServedSAE, image: Image.Image) -> torch.Tensor:
        """[d] the image's row at the SAE's hook point."""
        hook = served.config.hook_point
        return self.image_rows([hook], [image], served.config.token)[hook].values[0]

    def caption_vector(self, served: ServedSAE, caption: str, image: Image.Image | None) -> torch.Tensor:
        """[d] the caption's row at the SAE's text hook point (LLaVA's language-model hooks read it
        after its image)."""
        hook = served.config.text_hook_point
        if hook is None:
            raise BadInputError(f"SAE {served.id!r} reads images only: it cannot interpret a caption")
        pixels = None
        if "pixels" in required_inputs(self.backbone.config, [hook]):
            if image is None:
                raise BadInputError(
                    f"SAE {served.id!r} reads a caption after its image ({hook!r}): give both"
                )
            pixels = self.backbone.pixels([image])
        rows = self.backbone.activations(
            [hook], pixels=pixels, texts=[caption], item_ids=["0"], token=served.config.token
        )
        return rows[hook].values[0]

    @torch.no_grad()
    def interpret(self, served: ServedSAE, image: Image.Image | None, caption: str | None, k: int) -> dict:
        """The named concepts of an image and/or a caption; with both, those they share and those
        only one side has (`vlsae_ray.interpret.explain.explain_pair`)."""
        from vlsae_ray.interpret.explain import explain_pair

        x = {
            "image": None if image is None else self.image_vector(served, image),
            "caption": None if caption is None else self.caption_vector(served, caption, image),
        }
        x = {
            side: None if x_d is None else served.sae_input(x_d[None].to(self.device), modality)[0]
            for (side, x_d), modality in zip(x.items(), ("vision", "text"), strict=True)
        }
        out = {
            side: None if x_d is None else top_concepts(served, served.sae.encode(x_d[None])[0].cpu(), k)
            for side, x_d in x.items()
        }
        pair = {"shared": None, "image_only": None, "text_only": None}
        if image is not None and caption is not None:
            explained = explain_pair(served.sae, x["image"], x["caption"], served.entries, k)
            pair = {side: [asdict(c) for c in getattr(explained, side)] for side in pair}
        return out | pair

    @torch.no_grad()
    def patch_map(self, served: ServedSAE, image: Image.Image, latent: int) -> dict:
        """The latent's activation on each image patch: {latent, grid: [h, w], values (row-major)}."""
        served.check_latent(latent)
        hook = served.config.hook_point
        rows = self.image_rows([hook], [image], ALL_TOKENS)[hook]
        if (rows.token < 0).all():
            raise BadInputError(f"hook point {hook!r} of SAE {served.id!r} is pooled: it has no patches")
        patches = rows.values[rows.token > 0]  # token 0 is the class token
        side = math.isqrt(len(patches))
        if side * side != len(patches):
            raise BadInputError(f"hook point {hook!r} has {len(patches)} patch tokens, not a square grid")
        values = served.codes(patches.to(self.device))[:, latent].float().cpu()
        return {"latent": latent, "grid": [side, side], "values": values.tolist()}

    @torch.no_grad()
    def _output(self, image: Image.Image, labels: list[str] | None, question: str | None) -> dict:
        if self.llava:
            from vlsae_ray.world.llava import answer

            return {
                "answer": answer(self.backbone.model, self.processor, [image], question)[0],
                "labels": None,
            }
        model = self.backbone.model
        image_e = model.encode_image(self.backbone.pixels([image]).to(self.device), normalize=True)
        text_le = model.encode_text(self.backbone.tokenizer(labels).to(self.device), normalize=True)
        probabilities = (model.logit_scale.exp() * image_e @ text_le.T).softmax(-1)[0].tolist()
        return {
            "answer": None,
            "labels": [{"label": s, "probability": p} for s, p in zip(labels, probabilities, strict=True)],
        }

    def steer(
        self,
        served: ServedSAE,
        image: Image.Image,
        edits: list[dict],
        *,
        relative: bool,
        labels: list[str] | None = None,
        question: str | None = None,
        mode: str = "delta",
        tokens: str = "all",
    ) -> dict:
        """{default, steered}: the model's output on `image` unsteered (no SAE in the path) and with
        `edits` ({latent, op, value}) applied at the SAE's hook point. A LLaVA backbone answers
        `question`; a CLIP one classifies zero-shot over `labels` (each encoded as written)."""
        if self.llava and not question:
            raise BadInputError("a LLaVA backbone answers a question: give question")
        if not self.llava and not labels:
            raise BadInputError("a CLIP backbone classifies zero-shot over labels: give at least one label")
        edit_map = {}
        for edit in edits:
            served.check_latent(edit["latent"])
            value = edit.get("value")
            if edit["op"] != "ablate" and value is None:
                raise BadInputError(f"edit of latent {edit['latent']} ({edit['op']}) needs a value")
            if relative and edit["op"] in ("set", "add"):
                value = value * served.max_activation(edit["latent"])
            edit_map[edit["latent"]] = _edit(edit["op"], value)
        module = f"model.{served.config.hook_point}" if self.llava else served.config.hook_point
        default = self._output(image, labels, question)
        with steered(self.backbone.model, module, served.sae, edit_map, mode=mode, tokens=tokens):
            steered_output = self._output(image, labels, question)
        return {"default": default, "steered": steered_output}

    @torch.no_grad()
    def mitigate(self, served: ServedSAE, image: Image.Image, question: str, **settings: float) -> dict:
        """{default, mitigated}: LLaVA's plain greedy answer to `question` about `image`, and its answer
        with the VL-SAE's concept mixing and contrastive decoding (`generate_mitigated`; settings
        alpha, beta, cd_alpha, cd_beta). The SAE must read `language_model.layers.N:chat_image_mean`
        behind an aligner: the edit is at the output of layer N - 1, where it was trained."""
        from vlsae_ray.backbones.llava import CHAT_IMAGE_MEAN
        from vlsae_ray.steer.hallucination import generate_mitigated
        from vlsae_ray.world.llava import answer

        hook = served.config.hook_point
        layer = hook.removeprefix("language_model.layers.").removesuffix(CHAT_IMAGE_MEAN)
        if not (self.llava and served.aligner is not None and hook.endswith(CHAT_IMAGE_MEAN)):
            raise BadInputError(
                f"SAE {served.id!r} cannot mitigate: that needs a LLaVA backbone and a VL-SAE on "
                f"language_model.layers.N{CHAT_IMAGE_MEAN} served with its aligner (`aligner` in its config)"
            )
        if not layer.isdigit() or int(layer) == 0:
            raise BadInputError(
                f"hook point {hook!r}: mitigation edits the layer before N, so N must be >= 1"
            )
        model = self.backbone.model
        try:
            mitigated = generate_mitigated(
                model,
                self.processor,
                [image],
                question,
                served.aligner,
                served.sae,
                layer=int(layer) - 1,
                **settings,
            )[0]
        except ValueError as error:  # settings or artifacts that do not fit together
            raise BadInputError(str(error)) from None
        return {"default": answer(model, self.processor, [image], question)[0], "mitigated": mitigated}


def top_concepts(served: ServedSAE, codes_f: torch.Tensor, k: int) -> list[dict]:
    """The k largest active latents of one code vector, named from the catalog, largest first."""
    values, latents = codes_f.topk(min(k, codes_f.shape[0]))
    return [
        {
            "latent": j,
            "activation": v,
            "name": served.entries.get(j, {}).get("name"),
            "confidence": served.entries.get(j, {}).get("confidence"),
        }
        for j, v in zip(latents.tolist(), values.tolist(), strict=True)
        if v > 0
    ]
