"""Naming latents: the vocabulary concept that explains where a latent fires.

Four methods (the label config's `naming`), each comparing the latent with every concept of a
vocabulary through a CLIP that shares an image and a text space:

- `activations` (the default): the latent's activation pattern over the whole dataset against each
  concept's zero-shot pattern. The pattern is the probability CLIP's zero-shot classifier gives the
  concept on each image (softmax at the model's logit scale, Radford et al. 2021, sec. 3.1.2), over
  the concept's block of the vocabulary: a block lists alternatives (an object has one colour and
  one shape), so a red triangle is judged "red" among colours and "triangle" among shapes rather
  than the two competing. The score is the chance-corrected agreement (Cohen's kappa's form)
  A = (m - b) / (1 - b), where m is the activation-weighted share of images holding the concept
  (sum_i z_i p_i / sum_i z_i, CLIP's probability as a soft label) and b its share among all
  images: 1 when every image the latent fires on holds the concept, 0 when no more of them do than
  of images in general, so a common concept does not win by being common. Of the concepts within
  `TIE` of the best agreement, the rarest is the name (`specific_names`). It is computed from
  streamed sums (`PatternSums`) and sees every image the latent fires on, weighted by how strongly.
  This is CLIP-Dissect's idea (Oikarinen and Weng, ICLR 2023: match a neuron's activation pattern
  with a concept's CLIP pattern) with the whole dataset in place of the top images. For a VL-SAE on
  CLIP embeddings its caption rows join the image rows, each against the concepts' pattern over the
  caption embeddings, so its names use its captions too.
- `clip_dissect`: CLIP-Dissect's SoftWPMI over the latent's top-k images (`clip_dissect_scores`).
- `top_images`: the mean unit image embedding of the latent's top-k images minus the mean unit
  embedding of all images, i.e. what its top images have that images in general do not, compared
  with each concept's text embedding by cosine. Subtracting the dataset mean removes the component
  every image shares (in CLIP a large one, plus the gap between the image and the text cone).
- `decoder`: the latent's decoder direction, when the SAE was trained on the embedding space
  itself (its activation dataset is hook `visual`): the decoder row is already a difference from
  the decoder bias, so it needs no centring. For a VL-SAE, its vision decoder.

Each concept's text embedding is the normalised mean of its prompts' unit embeddings, one prompt
per template (prompt ensembling, Radford et al. 2021, sec. 3.1.4). The name is the concept with
the highest score; the runner-up is the second.

Every name is checked on held-out images (a fold of the items the names were not chosen on):
`heldout_auroc` is the AUROC of the named concept's zero-shot score against the latent's firing,
0.5 for a name that says nothing about where the latent fires, 1 for one that separates its firing
images from the rest (Neuronpedia's idea of scoring an explanation by how well it predicts the
activations).

Confidence: for `activations`, the probability that the name is right, i.e. held by the latent's
top images (the ones the catalog shows): a logistic function of the name's top share, the mean
zero-shot probability of the named concept over those images (`calibrated_confidence`), fitted on
the concept world's ground truth. A latent whose name falls below the label config's
`min_confidence` stays unnamed (its name is null) rather than get a confident wrong name. On the
concept world it is calibrated on the seed it was fitted on and on a held-out seed and split
(benchmarks/README.md). For the other methods it is the softmax probability of the name over the
vocabulary at the model's logit scale (top_images, decoder) or over the SoftWPMI scores
(clip_dissect): comparable across latents, not calibrated.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import torch

from vlsae_ray import storage
from vlsae_ray.config import BackboneConfig

DEFAULT_VOCABULARY = Path(__file__).with_name("vocabulary.txt")
# The concept world's own concepts (colours, shapes, sizes, ...), one phrase each: `vocabulary: world`.
WORLD_VOCABULARY = Path(__file__).with_name("world_vocabulary.txt")


class Vocabulary(list):
    """The concepts of a vocabulary (a list of str), each with the block of alternatives it is in."""

    def __init__(self, blocks: list[list[str]]):
        super().__init__(concept for block in blocks for concept in block)
        self.block_v = torch.tensor([b for b, block in enumerate(blocks) for _ in block])


def load_vocabulary(uri: str | None = None) -> Vocabulary:
    """The concepts of a vocabulary file: one per line, blank lines skipped; a `#` comment line starts
    a new block, and the concepts of a block are alternatives to each other (colours, shapes, ...).

    None: the default vocabulary that ships with the package (general visual concepts and the
    concept world's colours, shapes, sizes, patterns, counts, positions and backgrounds); "world":
    the concept world's part of it alone.
    """
    if uri is None or uri == "world":
        text = (DEFAULT_VOCABULARY if uri is None else WORLD_VOCABULARY).read_text()
    else:
        text = storage.read_text(uri)
    blocks: list[list[str]] = [[]]
    for line in map(str.strip, text.splitlines()):
        if line.startswith("#"):
            blocks.append([])
        elif line:
            blocks[-1].append(line)
    blocks = [block for block in blocks if block]
    concepts = [concept for block in blocks for concept in block]
    where = "the default vocabulary" if uri is None else f"vocabulary {uri!r}"
    if len(concepts) < 2:
        raise ValueError(f"{where} has {len(concepts)} concepts; a name needs at least 2 to choose from")
    repeated = sorted({concept for concept in concepts if concepts.count(concept) > 1})
    if repeated:
        raise ValueError(f"{where} lists {repeated} more than once; keep one line per concept")
    alone = [block[0] for block in blocks if len(block) == 1]
    if alone:
        raise ValueError(
            f"{where}: {alone} are alone in their block (a `#` line starts one); a block lists "
            "alternatives to each other, so give each at least one alternative or join it to the block above"
        )
    return Vocabulary(blocks)


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
    similarity: torch.Tensor  # [F] the method's score of the name: cosine, agreement or SoftWPMI
    confidence: torch.Tensor  # [F] the name's confidence (module docstring); NaN without a name


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


def zero_shot_log_probability(
    unit_nd: torch.Tensor, concepts_vd: torch.Tensor, logit_scale: float, block_v: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, V] log-probability of each concept for each unit embedding under CLIP's zero-shot classifier,
    over the concepts of its block (`block_v`, a block index per concept; None: one block)."""
    logits_nv = logit_scale * unit_nd.float() @ concepts_vd.T
    if block_v is None:
        return logits_nv.log_softmax(-1)
    log_p_nv = torch.empty_like(logits_nv)
    for block in block_v.unique():
        in_block = block_v == block
        log_p_nv[:, in_block] = logits_nv[:, in_block].log_softmax(-1)
    return log_p_nv


def in_heldout_fold(source_id: str, fraction: float) -> bool:
    """Whether an item belongs to the held-out fold: a stable hash of its id, the same on every run."""
    digest = int.from_bytes(hashlib.sha256(source_id.encode()).digest()[:8], "big")
    return digest < fraction * 2**64


class ShardSums(NamedTuple):
    """One shard's pattern sums over only the latents that fired in it, so that what a label task
    sends back grows with its rows, not with the SAE's width; `PatternSums.add_` folds it in."""

    rows: int
    p_v: torch.Tensor  # [V] sum of each concept's probability
    latents_u: torch.Tensor  # [U] the latents that fired, each once
    z_u: torch.Tensor  # [U] sum of each one's activation
    zp_uv: torch.Tensor  # [U, V] sum of its products with each concept's probability

    @classmethod
    def of(
        cls, rows_n: torch.Tensor, latents_n: torch.Tensor, values_n: torch.Tensor, p_rv: torch.Tensor
    ) -> ShardSums:
        """The sums of R rows, from their latents as (row, latent, value) entries, zero elsewhere."""
        p, values = p_rv.double(), values_n.double()
        latents_u, u_n = latents_n.unique(return_inverse=True)
        z_u = torch.zeros(len(latents_u), dtype=torch.float64).index_add_(0, u_n, values)
        zp_uv = torch.zeros(len(latents_u), p.shape[1], dtype=torch.float64)
        zp_uv.index_add_(0, u_n, values[:, None] * p[rows_n])
        return cls(p.shape[0], p.sum(0), latents_u, z_u, zp_uv)


class PatternSums(NamedTuple):
    """Sums over rows from which the agreement of F latents with V concept patterns follows."""

    rows: torch.Tensor  # [] rows summed
    z_f: torch.Tensor  # sum of each latent's activation
    p_v: torch.Tensor  # sum of each concept's probability
    zp_fv: torch.Tensor  # sum of their products

    @classmethod
    def zeros(cls, n_latents: int, n_concepts: int) -> PatternSums:
        f64 = torch.float64
        return cls(
            torch.zeros((), dtype=f64),
            torch.zeros(n_latents, dtype=f64),
            torch.zeros(n_concepts, dtype=f64),
            torch.zeros(n_latents, n_concepts, dtype=f64),
        )

    @classmethod
    def of(
        cls,
        rows_n: torch.Tensor,
        latents_n: torch.Tensor,
        values_n: torch.Tensor,
        p_rv: torch.Tensor,
        n_latents: int,
    ) -> PatternSums:
        """The sums of R rows, from their latents as (row, latent, value) entries, zero elsewhere."""
        sums = cls.zeros(n_latents, p_rv.shape[1])
        sums.add_(ShardSums.of(rows_n, latents_n, values_n, p_rv))
        return sums

    def add_(self, shard: ShardSums) -> None:
        """Fold one shard's sums in, in place (no copy of the [F, V] sums per shard)."""
        self.rows.add_(shard.rows)
        self.p_v.add_(shard.p_v)
        self.z_f.index_add_(0, shard.latents_u, shard.z_u)
        self.zp_fv.index_add_(0, shard.latents_u, shard.zp_uv)

    def __add__(self, other: PatternSums) -> PatternSums:  # type: ignore[override]
        return PatternSums(*(a + b for a, b in zip(self, other, strict=True)))

    def mean_p(self) -> torch.Tensor:
        """[V] each concept's mean probability over the rows."""
        return (self.p_v / self.rows.clamp_min(1)).float()

    def agreement(self) -> torch.Tensor:
        """[F, V] chance-corrected agreement (m - b) / (1 - b) of each latent with each concept (module
        docstring); NaN for a latent that never fired."""
        m_fv = self.zp_fv / self.z_f.clamp_min(1e-30)[:, None]
        b_v = self.p_v / self.rows.clamp_min(1)
        a_fv = (m_fv - b_v) / (1 - b_v).clamp_min(1e-12)
        return torch.where(self.z_f[:, None] > 0, a_fv, float("nan")).float()


def clip_dissect_scores(
    top_log_p_kfv: torch.Tensor, valid_kf: torch.Tensor, mean_p_v: torch.Tensor, lam: float = 1.0
) -> torch.Tensor:
    """[F, V] CLIP-Dissect's SoftWPMI of each latent's top-k images and each concept.

    Oikarinen and Weng (ICLR 2023), sec. 3 and their `soft_wpmi`: the top images form a soft set,
    the i-th in with probability falling linearly from 0.998 to 0.97; the probability that the set
    holds concept t is 1 - prod_i (1 - p_i p(t|x_i)); SoftWPMI is its log minus lam log p(t), where
    p(t) is the concept's mean probability over all images. Rows that are not valid top images
    (the latent fired on fewer than k) take no part.
    """
    k = top_log_p_kfv.shape[0]
    in_set_k = torch.linspace(0.998, 0.97, k) if k > 1 else torch.tensor([0.998])
    weight_kf = in_set_k[:, None] * valid_kf.float()
    absent_fv = torch.prod(1 - weight_kf[..., None] * top_log_p_kfv.exp(), dim=0)
    return (1 - absent_fv).clamp_min(1e-7).log() - lam * mean_p_v.clamp_min(1e-7).log()[None]


def heldout_auroc(
    s_nv: torch.Tensor, rows_n: torch.Tensor, latents_n: torch.Tensor, concept_f: torch.Tensor
) -> torch.Tensor:
    """[F] AUROC of the named concept's zero-shot score against the latent's firing on held-out rows.

    `s_nv`: the concepts' scores on the N held-out rows; (rows_n, latents_n): where each latent
    fires (at most once per row and latent); `concept_f`: each latent's named concept (-1: none).
    By the rank-sum form (Mann-Whitney U / (n1 n0)); NaN where a latent has no name or fires on
    none or all of the rows.
    """
    n_rows, n_latents = s_nv.shape[0], concept_f.shape[0]
    ranks_nv = s_nv.argsort(0).argsort(0).double() + 1
    named_n = concept_f[latents_n] >= 0
    rows_n, latents_n = rows_n[named_n], latents_n[named_n]
    rank_sum_f = torch.zeros(n_latents, dtype=torch.float64)
    rank_sum_f.index_add_(0, latents_n, ranks_nv[rows_n, concept_f[latents_n]])
    fired_f = torch.bincount(latents_n, minlength=n_latents).double()
    auroc_f = (rank_sum_f - fired_f * (fired_f + 1) / 2) / (fired_f * (n_rows - fired_f))
    defined_f = (concept_f >= 0) & (fired_f > 0) & (fired_f < n_rows)
    return torch.where(defined_f, auroc_f, float("nan")).float()


def names_from_scores(scores_fv: torch.Tensor, vocabulary: list[str]) -> Names:
    """The best and second concept of each latent's row of scores; a row of NaN (a latent that never
    fired) gets no name. Confidence is NaN (the caller sets it)."""
    live_f = ~scores_fv.isnan().all(-1)
    best_f2 = scores_fv.nan_to_num(float("-inf")).topk(2, dim=-1)

    def concept(rank: int) -> list[str | None]:
        indices = best_f2.indices[:, rank].tolist()
        return [vocabulary[i] if ok else None for i, ok in zip(indices, live_f.tolist(), strict=True)]

    nan = torch.tensor(float("nan"))
    score_f = torch.where(live_f, best_f2.values[:, 0], nan)
    return Names(concept(0), concept(1), score_f, nan.expand(len(live_f)).clone())


# Agreements within TIE of a latent's best are a tie: on a few dozen images CLIP's probabilities are
# about that noisy. The rarest tied concept is the most specific name its images share ("green
# objects" rather than "a black background" when its images are green squares on black).
TIE = 0.1


def specific_names(agreement_fv: torch.Tensor, mean_p_v: torch.Tensor, vocabulary: list[str]) -> Names:
    """Each latent's name: of the concepts whose agreement is within TIE of its best, the one with the
    smallest mean probability over all images; the runner-up is the next rarest tied concept, or the
    best of the rest. The similarity is the name's agreement."""
    best_f1 = agreement_fv.nan_to_num(float("-inf")).max(-1, keepdim=True).values
    rank_fv = torch.where(
        agreement_fv >= best_f1 - TIE, 2 - mean_p_v, agreement_fv
    )  # ties first, rarest first
    names = names_from_scores(rank_fv, vocabulary)
    chosen_f = rank_fv.nan_to_num(float("-inf")).argmax(-1, keepdim=True)
    return names._replace(similarity=agreement_fv.gather(1, chosen_f).squeeze(1))


def top_share(top_p_kf: torch.Tensor, valid_kf: torch.Tensor) -> torch.Tensor:
    """[F] the mean zero-shot probability of each latent's name over its valid top images; NaN for a
    latent without one."""
    count_f = valid_kf.sum(0)
    share_f = (top_p_kf * valid_kf).sum(0) / count_f.clamp_min(1)
    return torch.where(count_f > 0, share_f, float("nan"))


# Logistic calibration of `activations` names, P(right) = sigmoid(bias + w_top_share top share), fitted
# on the concept world's ground truth (`benchmarks/naming.py --fit`: the default seed's latents of the
# demo recipe's SAE; a name is right when at least 8 of the latent's 9 top images hold it).
CALIBRATION = {"bias": -18.39, "top_share": 24.07}


def calibrated_confidence(top_share_f: torch.Tensor) -> torch.Tensor:
    """[F] probability that an `activations` name is right (held by the latent's top images), from its
    top share (`top_share`)."""
    return torch.sigmoid(CALIBRATION["bias"] + CALIBRATION["top_share"] * top_share_f)
