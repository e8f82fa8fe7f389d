"""Naming latents: the vocabulary concept whose CLIP text embedding is nearest the latent's direction.

A latent's direction lives in the image-embedding space of a CLIP (the space its text embeddings
share), found one of two ways (the label config's `naming`):

- `top_images`: the mean unit image embedding of the latent's top-k images minus the mean unit
  embedding of all images, i.e. what its top images have that images in general do not. Needs an
  image-embedding dataset over the same items (e.g. hook `visual`). Subtracting the dataset mean
  removes the component every image shares (in CLIP a large one, plus the gap between the image
  and the text cone), which otherwise pulls every latent towards the same few names.
- `decoder`: the latent's decoder direction, when the SAE was trained on the embedding space
  itself (its activation dataset is hook `visual`): the decoder row is already a difference from
  the decoder bias, so it needs no centring. For a VL-SAE, its vision decoder.

Each concept's text embedding is the normalised mean of its prompts' unit embeddings, one prompt
per template (prompt ensembling, Radford et al. 2021, sec. 3.1.4). The name is the concept with
the highest cosine; the runner-up is the second.

Confidence: the softmax probability of the name over the whole vocabulary at the model's own
learned logit scale (CLIP's zero-shot classifier probability, Radford et al. 2021, sec. 3.1.2). It
is in [0, 1] and comparable across latents; it falls when the runner-up is close (a small margin)
and also when many concepts are close, which a bare best-minus-second margin misses, and it
uses the temperature the model was trained with instead of one we would have to pick.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from vlsae_ray import storage
from vlsae_ray.config import BackboneConfig

DEFAULT_VOCABULARY = Path(__file__).with_name("vocabulary.txt")


def load_vocabulary(uri: str | None = None) -> list[str]:
    """The concepts of a vocabulary file (one per line; `#` comments and blank lines skipped).

    None: the default vocabulary that ships with the package (general visual concepts and the
    concept world's colours, shapes, sizes, patterns, counts, positions and backgrounds).
    """
    text = DEFAULT_VOCABULARY.read_text() if uri is None else storage.read_text(uri)
    concepts = [line.strip() for line in text.splitlines()]
    concepts = [concept for concept in concepts if concept and not concept.startswith("#")]
    where = "the default vocabulary" if uri is None else f"vocabulary {uri!r}"
    if len(concepts) < 2:
        raise ValueError(f"{where} has {len(concepts)} concepts; a name needs at least 2 to choose from")
    repeated = sorted({concept for concept in concepts if concepts.count(concept) > 1})
    if repeated:
        raise ValueError(f"{where} lists {repeated} more than once; keep one line per concept")
    return concepts


class TextEncoder:
    """A CLIP's text tower: unit text embeddings in the space its image embeddings share."""

    def __init__(self, config: BackboneConfig):
        from vlsae_ray.backbones import load_backbone

        if config.library != "open_clip":
            raise ValueError(
                f"naming reads text embeddings from an open_clip model; text_model has library "
                f"{config.library!r}: set text_model to an open_clip backbone config"
            )
        backbone = load_backbone(config)
        self.model, self.tokenizer = backbone.model, backbone.tokenizer
        self.logit_scale = float(self.model.logit_scale.exp())

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(texts).to(device), normalize=True).float().cpu()


def concept_embeddings(encoder: TextEncoder, concepts: list[str], prompts: list[str]) -> torch.Tensor:
    """[V, D] unit vectors: each concept's prompts embedded, averaged and renormalised."""
    texts = [prompt.format(concept) for concept in concepts for prompt in prompts]
    unit_pd = encoder.embed(texts)
    return torch.nn.functional.normalize(unit_pd.view(len(concepts), len(prompts), -1).mean(1), dim=-1)


class Names(NamedTuple):
    name: list[str | None]  # None: a latent without a direction (it never fired)
    runner_up: list[str | None]
    similarity: torch.Tensor  # [F] cosine of the direction and the name (NaN without a name)
    confidence: torch.Tensor  # [F] softmax probability of the name over the vocabulary


def top_image_directions(
    top_unit_kfd: torch.Tensor, valid_kf: torch.Tensor, mean_unit_d: torch.Tensor
) -> torch.Tensor:
    """[F, D]: the mean unit embedding of each latent's valid top images minus the mean of all images.

    A latent with no valid top image (it never fired) gets a zero direction.
    """
    weights_kf = valid_kf.float()
    count_f = weights_kf.sum(0)
    mean_fd = (top_unit_kfd * weights_kf[..., None]).sum(0) / count_f.clamp_min(1)[:, None]
    return torch.where(count_f[:, None] > 0, mean_fd - mean_unit_d, 0.0)


def name_latents(
    directions_fd: torch.Tensor, concepts_vd: torch.Tensor, vocabulary: list[str], logit_scale: float
) -> Names:
    """Each latent's nearest concept, the runner-up, the cosine and the confidence."""
    if directions_fd.shape[1] != concepts_vd.shape[1]:
        raise ValueError(
            f"latent directions have width {directions_fd.shape[1]} but the text embeddings have "
            f"{concepts_vd.shape[1]}: name with the text model of the CLIP whose image embeddings these are"
        )
    has_direction_f = directions_fd.norm(dim=-1) > 0
    cos_fv = torch.nn.functional.normalize(directions_fd.float(), dim=-1) @ concepts_vd.T
    best_f2 = cos_fv.topk(2, dim=-1)
    probability_fv = (logit_scale * cos_fv).softmax(-1)
    confidence_f = probability_fv.gather(1, best_f2.indices[:, :1]).squeeze(1)

    def concept(rank: int) -> list[str | None]:
        indices, named = best_f2.indices[:, rank].tolist(), has_direction_f.tolist()
        return [vocabulary[i] if ok else None for i, ok in zip(indices, named, strict=True)]

    nan = torch.tensor(float("nan"))
    return Names(
        name=concept(0),
        runner_up=concept(1),
        similarity=torch.where(has_direction_f, best_f2.values[:, 0], nan),
        confidence=torch.where(has_direction_f, confidence_f, nan),
    )
