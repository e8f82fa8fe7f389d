"""Hallucination mitigation in LLaVA with a VL-SAE: text concepts mixed toward the image's, and
contrastive decoding (arXiv 2510.21323, Sec. 4.3; the authors' `vlsae_sample.py`).

At every decoding step the whole sequence is run twice (the text mean changes with each new
token, so every text position's edit does too; the authors also recompute it, `use_cache=False`):
a plain forward, logits l, and one in which the output h of decoder layer `layer` is edited:

    v = mean of h over the image positions, t = mean over every later position (the question,
        the template's tokens and the answer so far)
    z_v = enc(P_v v), z_t = enc(P_t t)                 the VL-SAE's concepts of each side, through
                                                       the aligner's projections
    z_t' = (1 - beta) z_t + beta z_v                   text concepts mixed toward the image's
    t_hat = D_t(Dec_t(z_t')), t' = (1 - alpha) t + alpha t_hat
    h_i += t' - t                                      at every text position (image ones unchanged)

giving logits l_sae. The next token is the best of (1 - cd_alpha) l + cd_alpha l_sae among the
tokens whose plain logit is within log(cd_beta) of the best plain logit (the authors sample from
it; we decode greedily, as the world LLaVA's answers do). With alpha = 0 the edit is exactly zero
and with cd_alpha = 0 the plain logits decide, so either gives plain greedy decoding.

The aligner and VL-SAE must be trained on what this edits: the output of layer `layer`, i.e. the
backbone's `language_model.layers.{layer + 1}:chat_image_mean` / `:chat_text_mean` (the authors'
reduction: the input of the next layer, template tokens included, as here). The authors train on
layer 30's input and edit its output, one layer apart; we edit where we train.

    answers = generate_mitigated(model, processor, images, questions, aligner, sae, layer=1)
"""

from __future__ import annotations

import contextlib
import math

import torch

DEFAULTS = {"alpha": 0.8, "beta": 0.9, "cd_alpha": 0.6, "cd_beta": 0.8}


def check_options(
    model, aligner, sae, *, layer: int, alpha: float, beta: float, cd_alpha: float, cd_beta: float
):
    """Refuse settings and artifacts that do not fit together, before any forward."""
    for name, value in (("alpha", alpha), ("beta", beta), ("cd_alpha", cd_alpha)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value} must lie in [0, 1]")
    if not 0 < cd_beta <= 1:
        raise ValueError(
            f"cd_beta={cd_beta} must lie in (0, 1]: the least probability kept, as a share of the best"
        )
    n_layers = model.config.text_config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer}: the language model has layers 0..{n_layers - 1}")
    hidden = model.config.text_config.hidden_size
    if aligner.config.d_in != hidden:
        raise ValueError(
            f"the aligner reads width {aligner.config.d_in}, but the language model's is {hidden}"
        )
    if getattr(sae.config, "architecture", None) != "vl_sae":
        raise ValueError("mitigation needs a VL-SAE (one encoder, a text decoder)")
    if sae.config.d_in != aligner.config.d_proj:
        raise ValueError(
            f"the VL-SAE reads width {sae.config.d_in}, but the aligner projects to {aligner.config.d_proj}"
        )


@torch.no_grad()
def mix_concepts(v_bd, t_bd, aligner, sae, *, alpha: float, beta: float):
    """(t' - t, z_t'): the shift of the text mean and the mixed text concepts, for image means
    v_bd and text means t_bd [B, d]."""
    z_v = sae.encode(aligner.project(v_bd, "vision"))
    z_t = sae.encode(aligner.project(t_bd, "text"))
    z_mixed = (1 - beta) * z_t + beta * z_v
    t_hat = aligner.decode(sae.decode(z_mixed, "text"), "text")
    return (1 - alpha) * t_bd + alpha * t_hat - t_bd, z_mixed


def positions(input_ids, attention_mask, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [B, T], text [B, T]) masks: the image tokens, and every real token after the last one."""
    image_bt = input_ids == image_token_id
    after_bt = image_bt.long().cumsum(1) == image_bt.sum(1, keepdim=True)
    return image_bt, after_bt & ~image_bt & attention_mask.bool()


@contextlib.contextmanager
def concept_mixing(model, layer: int, aligner, sae, image_bt, text_bt, *, alpha: float, beta: float):
    """While open, forwards of `model` on sequences with these image and text masks [B, T] have
    the output of decoder layer `layer` edited as the module docstring says."""

    def hook(_module, _inputs, output):
        h_btd = output[0] if isinstance(output, tuple) else output
        image, text = image_bt[..., None].to(h_btd.dtype), text_bt[..., None].to(h_btd.dtype)
        v_bd = (h_btd * image).sum(1) / image.sum(1)
        t_bd = (h_btd * text).sum(1) / text.sum(1)
        shift_bd, _ = mix_concepts(v_bd, t_bd, aligner, sae, alpha=alpha, beta=beta)
        h_btd = h_btd + text * shift_bd[:, None]
        return (h_btd, *output[1:]) if isinstance(output, tuple) else h_btd

    # prepend: transformers records hidden states with hooks of its own, which must see the edit
    handle = model.model.language_model.layers[layer].register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def mitigated_logits(model, inputs: dict, aligner, sae, *, layer: int, alpha, beta, cd_alpha, cd_beta):
    """(next-token scores, plain logits l, edited logits l_sae) [B, V] of the sequences `inputs`
    (input_ids, attention_mask, pixel_values; position_ids for left padding): scores are
    (1 - cd_alpha) l + cd_alpha l_sae, -inf where l is below log(cd_beta) + max l."""
    plain = model(**inputs, use_cache=False).logits[:, -1]
    image_bt, text_bt = positions(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id)
    with concept_mixing(model, layer, aligner, sae, image_bt, text_bt, alpha=alpha, beta=beta):
        edited = model(**inputs, use_cache=False).logits[:, -1]
    cutoff = math.log(cd_beta) + plain.max(dim=-1, keepdim=True).values
    scores = ((1 - cd_alpha) * plain + cd_alpha * edited).masked_fill(plain < cutoff, -math.inf)
    return scores, plain, edited


def _chat_prompts(processor, questions: list[str]) -> list[str]:
    turns = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions
    ]
    return processor.apply_chat_template(turns, add_generation_prompt=True)


@torch.no_grad()
def generate_mitigated(
    model,
    processor,
    images: list,
    questions: list[str] | str,
    aligner,
    sae,
    *,
    layer: int,
    alpha: float = DEFAULTS["alpha"],
    beta: float = DEFAULTS["beta"],
    cd_alpha: float = DEFAULTS["cd_alpha"],
    cd_beta: float = DEFAULTS["cd_beta"],
    max_new_tokens: int = 20,
) -> list[str]:
    """Greedy answers of a LLaVA, row i answering `questions[i]` (or the one question) about
    `images[i]` in the model's chat template, with concept mixing at `layer` and contrastive decoding."""
    if isinstance(questions, str):
        questions = [questions] * len(images)
    if len(questions) != len(images):
        raise ValueError(f"{len(images)} images but {len(questions)} questions; give one per image, or one")
    check_options(
        model, aligner, sae, layer=layer, alpha=alpha, beta=beta, cd_alpha=cd_alpha, cd_beta=cd_beta
    )
    if not images:
        return []
    aligner, sae = aligner.to(model.device).eval(), sae.to(model.device).eval()
    batch = processor(
        images=list(images),
        text=_chat_prompts(processor, questions),
        padding=True,
        padding_side="left",
        return_tensors="pt",
    ).to(model.device)
    ids, mask, prompt_length = batch["input_ids"], batch["attention_mask"], batch["input_ids"].shape[1]
    eos = torch.tensor(model.generation_config.eos_token_id, device=ids.device).flatten()
    pad = processor.tokenizer.pad_token_id
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": batch["pixel_values"],
            "position_ids": (mask.cumsum(1) - 1).clamp_min(0),  # as generate() numbers left-padded rows
        }
        scores, _, _ = mitigated_logits(
            model,
            inputs,
            aligner,
            sae,
            layer=layer,
            alpha=alpha,
            beta=beta,
            cd_alpha=cd_alpha,
            cd_beta=cd_beta,
        )
        token = torch.where(done, pad, scores.argmax(dim=-1))
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, (~done).long()[:, None]], 1)
        done |= torch.isin(token, eos)
        if bool(done.all()):
            break
    return [text.strip() for text in processor.batch_decode(ids[:, prompt_length:], skip_special_tokens=True)]
