"""Steering measured on the concept world's ground truth.

A concept latent is a catalog latent whose top images (distinct world items) all share one
attribute value, e.g. colour=red. It is clamped to s times its maximum activation (the catalog's
top activation), on held-out images that lack that value, and the steered model is asked about
every attribute:
- flip: the prediction of the latent's attribute becomes its value (chance: 1 / values);
- hold: the other attributes' predictions stay what the unsteered model said, over all of them and
  over the attributes the model knows (unsteered accuracy at least `KNOWN_ACCURACY` on the same
  images: a chance-level guess moves with any perturbation and says nothing about selectivity).

CLIP predicts by zero-shot classification (`vlsae_ray.world.zeroshot`); LLaVA answers each
attribute's question (`vlsae_ray.world.llava`). For LLaVA this also computes Pach et al.'s
steering score: cos(CLIP text embedding of the one-word answer, mean CLIP image embedding of the
latent's top images) over latents x one probe image per shape and latents x a blank white image,
next to the same score with the latents shuffled. The unsteered baseline runs with no SAE in the
path, as theirs does.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from vlsae_ray.interpret.catalog import max_activations
from vlsae_ray.interpret.ground_truth import shared_concept
from vlsae_ray.steer.hook import ABLATE, steered
from vlsae_ray.world import ATTRIBUTES, generate_item

KNOWN_ACCURACY = 0.9
GOAL_FLIP, GOAL_HOLD = 0.8, 0.9
WHITE = "white"  # probe id of a blank white image (Pach et al.'s second protocol)
ONE_WORD = "one_word"  # the prediction key of LLaVA's answer to Pach et al.'s one-word prompt
ANSWER_TOKENS = 5  # new tokens per answer, as Pach et al. generate for the one-word prompt


@dataclass(frozen=True)
class ConceptLatent:
    latent: int
    attribute: str
    value: str
    max_activation: float
    name: str | None = None


def concept_latents(catalog: pa.Table, min_images: int) -> list[ConceptLatent]:
    """The catalog's latents whose distinct top images (at least `min_images`) all share one value."""
    found = []
    maxima = max_activations(catalog)
    for row in catalog.select(["latent", "name", "top_source_ids"]).to_pylist():
        ids = list(dict.fromkeys(row["top_source_ids"] or []))  # token rows of one image count once
        if len(ids) < min_images:
            continue
        shared = shared_concept(ids)
        if shared is None or shared[1] < 1.0:
            continue
        attribute, value = shared[0].split("=")
        found.append(ConceptLatent(row["latent"], attribute, value, maxima[row["latent"]], row["name"]))
    return found


def spread(latents: list[ConceptLatent], limit: int | None) -> list[ConceptLatent]:
    """At most `limit` latents, taken in turn from each concept so that every concept is measured."""
    by_concept: dict[tuple[str, str], list[ConceptLatent]] = defaultdict(list)
    for latent in latents:
        by_concept[(latent.attribute, latent.value)].append(latent)
    rounds = [
        c[i]
        for i in range(max(map(len, by_concept.values()), default=0))
        for c in by_concept.values()
        if i < len(c)
    ]
    return sorted(rounds[:limit], key=lambda c: c.latent)


def steering_pairs(
    latents: list[ConceptLatent], n_images: int, split: str, seed: int, probes: bool
) -> list[dict]:
    """(latent, image) pairs: each latent with `n_images` items lacking its value; with `probes`
    also each latent with one image per shape and with a blank white image (the steering score)."""
    pool_size = 4 * n_images * max(len(v) for v in ATTRIBUTES.values())
    pool = [generate_item(i, split=split, seed=seed) for i in range(pool_size)]
    probe_ids = [next(it.id for it in pool if it.labels["shape"] == s) for s in ATTRIBUTES["shape"]] + [WHITE]
    pairs = []
    for latent in latents:
        lacking = [it.id for it in pool if it.labels[latent.attribute] != latent.value][:n_images]
        pairs += [{**asdict(latent), "item": item, "kind": "flip"} for item in lacking]
        if probes:
            pairs += [{**asdict(latent), "item": item, "kind": "probe"} for item in probe_ids]
    return pairs


def probe_image(item_id: str) -> Image.Image:
    if item_id == WHITE:
        return Image.new("RGB", (64, 64), "white")
    from vlsae_ray.activations.sources import load_image

    return load_image(item_id)


class Steerer:
    """A backbone and an SAE: the model's predictions for a batch of images, steered or not.

    An open_clip backbone predicts each attribute zero-shot; a LLaVA backbone answers each
    attribute's question and the one-word prompt.
    """

    def __init__(self, backbone, sae, hook_point: str, tokens: str = "all"):
        self.backbone, self.sae, self.hook_point, self.tokens = backbone, sae, hook_point, tokens
        self.llava = backbone.config.library == "llava"
        if self.llava:
            from vlsae_ray.backbones.llava import load_processor

            self.processor = load_processor(backbone.config)
        else:
            from vlsae_ray.world.zeroshot import class_embeddings

            self.classes = {a: class_embeddings(backbone.model, backbone.tokenizer, a) for a in ATTRIBUTES}

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> dict[str, list[str]]:
        """{attribute: each image's predicted value ("" if the answer names none)}, and one-word answers."""
        if self.llava:
            from vlsae_ray.world.llava import ATTRIBUTE_QUESTIONS, ONE_WORD_PROMPT, answer, parse_answer

            model = self.backbone.model
            out = {}
            for attribute, question in ATTRIBUTE_QUESTIONS.items():
                answers = answer(model, self.processor, images, question, max_new_tokens=ANSWER_TOKENS)
                out[attribute] = [parse_answer(attribute, text) or "" for text in answers]
            words = answer(model, self.processor, images, ONE_WORD_PROMPT, max_new_tokens=ANSWER_TOKENS)
            out[ONE_WORD] = [(text.split() or [""])[0] for text in words]
            return out
        features = self.backbone.model.encode_image(
            self.backbone.pixels(images).to(self.backbone.device), normalize=True
        )
        return {
            a: [ATTRIBUTES[a][i] for i in (features @ classes.T).argmax(-1).tolist()]
            for a, classes in self.classes.items()
        }

    def predict_steered(self, images, edits: list[dict], mode: str) -> dict[str, list[str]]:
        with steered(self.backbone.model, self.hook_point, self.sae, edits, mode=mode, tokens=self.tokens):
            return self.predict(images)


def pair_edits(pairs: list[dict], strength: float, families: dict[str, list[int]] | None) -> list[dict]:
    """Each pair's edit: its latent set to `strength` x its maximum activation; with `families`
    (attribute -> its concept latents) the attribute's other concept latents are ablated too."""
    edits = []
    for pair in pairs:
        edit = {pair["latent"]: strength * pair["max_activation"]}
        if families is not None:
            edit |= {j: ABLATE for j in families[pair["attribute"]] if j != pair["latent"]}
        edits.append(edit)
    return edits


def run_pairs(
    steerer: Steerer,
    pairs: list[dict],
    modes: list[str],
    strengths: list[float],
    families: dict[str, list[int]] | None = None,
) -> list[dict]:
    """One row per (pair, mode, strength), plus the unsteered prediction (mode "none", strength 0)."""
    images = [probe_image(pair["item"]) for pair in pairs]
    settings = [("none", 0.0)] + [(mode, s) for mode in modes for s in strengths]
    rows = []
    for mode, strength in settings:
        if mode == "none":
            predicted = steerer.predict(images)
        else:
            predicted = steerer.predict_steered(images, pair_edits(pairs, strength, families), mode)
        for i, pair in enumerate(pairs):
            rows.append(
                {
                    **pair,
                    "mode": mode,
                    "strength": strength,
                    "predicted": json.dumps({k: v[i] for k, v in predicted.items()}),
                }
            )
    return rows


def _mean_std(values) -> tuple[float, float]:
    values = np.asarray(list(values), dtype=float)
    return (float(values.mean()), float(values.std())) if len(values) else (float("nan"), float("nan"))


def summarize(rows: list[dict]) -> dict:
    """Flip and hold rates per attribute, mode and strength (mean and spread over latents), the best
    strength per attribute and mode, each latent's steerability, and the goal rows."""
    from vlsae_ray.activations.sources import world_labels

    flips = [r for r in rows if r["kind"] == "flip"]
    base = {(r["latent"], r["item"]): json.loads(r["predicted"]) for r in flips if r["mode"] == "none"}
    truth = {item: world_labels(item) for _, item in base}
    accuracy = {a: float(np.mean([base[key][a] == truth[key[1]][a] for key in base])) for a in ATTRIBUTES}
    known = [a for a, acc in accuracy.items() if acc >= KNOWN_ACCURACY]
    per_latent: dict[tuple, list[tuple[float, float, float]]] = defaultdict(list)
    for r in flips:
        if r["mode"] == "none":
            continue
        predicted, before = json.loads(r["predicted"]), base[(r["latent"], r["item"])]
        others = [a for a in ATTRIBUTES if a != r["attribute"]]
        others_known = [a for a in known if a != r["attribute"]] or others
        per_latent[(r["latent"], r["attribute"], r["value"], r["mode"], r["strength"])].append(
            (
                predicted[r["attribute"]] == r["value"],
                np.mean([predicted[a] == before[a] for a in others]),
                np.mean([predicted[a] == before[a] for a in others_known]),
            )
        )
    latent_rates = {key: np.mean(values, axis=0) for key, values in per_latent.items()}
    curves: dict = defaultdict(lambda: defaultdict(list))
    grouped: dict = defaultdict(list)
    for (_latent, attribute, _value, mode, strength), rates in latent_rates.items():
        grouped[(attribute, mode, strength)].append(rates)
    for (attribute, mode, strength), rates in sorted(grouped.items()):
        flip, hold, hold_known = np.array(rates).T
        curves[attribute][mode].append(
            {
                "strength": strength,
                "flip": _mean_std(flip),
                "hold": _mean_std(hold),
                "hold_known": _mean_std(hold_known),
                "latents": len(rates),
            }
        )
    best = {}
    for attribute, by_mode in curves.items():
        for mode, points in by_mode.items():
            holding = [p for p in points if p["hold_known"][0] >= GOAL_HOLD]
            point = (
                max(holding, key=lambda p: p["flip"][0])
                if holding
                else max(points, key=lambda p: p["hold_known"][0])
            )
            best[f"{attribute}/{mode}"] = {
                **point,
                "chance": 1 / len(ATTRIBUTES[attribute]),
                "goal_met": point["flip"][0] >= GOAL_FLIP and point["hold_known"][0] >= GOAL_HOLD,
            }
    steerability: dict[int, float] = {}
    for (latent, *_rest), (flip, _hold, hold_known) in latent_rates.items():
        steerability[latent] = max(steerability.get(latent, 0.0), float(flip * hold_known))
    summary = {
        "unsteered_accuracy": accuracy,
        "known_attributes": known,
        "curves": {a: dict(m) for a, m in curves.items()},
        "best": best,
        "steerability": steerability,
    }
    if any(r["kind"] == "probe" for r in rows):
        summary["probes"] = _probe_answers(rows)
    return summary


def _probe_answers(rows: list[dict]) -> dict:
    """{"none" or "mode/strength": {latent: {probe image: one-word answer}}}, for the steering score."""
    answers: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["kind"] == "probe":
            key = "none" if r["mode"] == "none" else f"{r['mode']}/{r['strength']:g}"
            answers[key][r["latent"]][r["item"]] = json.loads(r["predicted"])[ONE_WORD]
    return {key: dict(by_latent) for key, by_latent in answers.items()}


@torch.no_grad()
def steering_score(
    probes: dict, top_images: dict[int, list[str]], clip, preprocess, tokenizer, seed: int = 0
) -> dict:
    """Pach et al.'s steering score per setting and protocol (class images, white image): mean and
    std of cos(text embedding of the answer, mean image embedding of the latent's top images), and
    the same with latents shuffled (their baseline)."""
    latents = sorted(top_images)
    image_means = {}
    for latent in latents:
        pixels = torch.stack([preprocess(probe_image(item)) for item in top_images[latent]])
        image_means[latent] = clip.encode_image(pixels).mean(0)  # raw embeddings, as theirs
    shuffled = dict(zip(latents, np.random.default_rng(seed).permutation(latents).tolist(), strict=True))
    text_cache: dict[str, torch.Tensor] = {}

    def text(word: str) -> torch.Tensor:
        if word not in text_cache:
            text_cache[word] = clip.encode_text(tokenizer([word]))[0]
        return text_cache[word]

    scores = {}
    for setting, by_latent in probes.items():
        for protocol in ("class_images", "white_image"):
            real, baseline = [], []
            for latent, answers in by_latent.items():
                for item, word in answers.items():
                    if (item == WHITE) != (protocol == "white_image"):
                        continue
                    embedding = text(word)
                    real.append(float(torch.cosine_similarity(embedding, image_means[latent], dim=0)))
                    other = image_means[shuffled[latent]]
                    baseline.append(float(torch.cosine_similarity(embedding, other, dim=0)))
            scores[f"{setting}/{protocol}"] = {
                "score": _mean_std(real),
                "shuffled": _mean_std(baseline),
                "pairs": len(real),
            }
    return scores
