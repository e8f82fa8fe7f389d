"""Steering: edit SAE latents inside a model's forward pass, at one named module.

`steered(model, hook_point, sae, edits)` hooks the output h of `model.get_submodule(hook_point)`
(a [B, tokens, d] block output, or a [B, d] pooled one). On the chosen tokens it encodes h with
the SAE, z = encode(h), edits z to z', and returns

    delta (default):   h + decode(z') - decode(z)   the SAE's error term stays, so an empty edit
                                                    leaves h exactly as it was (saev, ViT-Prisma,
                                                    "delta-clamp");
    reconstruction:    decode(z')                   Pach et al. 2025's form: the layer's output is
                                                    replaced by the SAE's reconstruction.

Everything after the hook point runs on the edited activation: CLIP's later blocks and embedding,
or LLaVA's projector and language model (its `vision_feature_layer` hidden state is recorded after
our hook, which runs first among the module's hooks), so a steered `generate()` sees the edited
image on every generated token.

Edits: `{latent: value}` sets latents (Pach et al. clamp a latent to an absolute 100); an `Edit`
also adds or scales, and `Edit("set", 0.0)` ablates. With `max_activations` (a latent's largest
activation, e.g. the catalog's first `top_activations`) set and add values are multiples of it, as
saev's slider is. A list of edit maps gives each row of the batch its own edits, so one forward
serves many requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

MODES = ("delta", "reconstruction")
TOKENS = ("all", "cls", "patches")


@dataclass(frozen=True)
class Edit:
    """One latent's edit: z' = value ("set"), z + value ("add") or z * value ("scale")."""

    op: Literal["set", "add", "scale"]
    value: float

    def __post_init__(self):
        if self.op not in ("set", "add", "scale"):
            raise ValueError(f"edit op {self.op!r} is not one of 'set', 'add', 'scale'")


ABLATE = Edit("set", 0.0)
EditMap = Mapping[int, "float | Edit"]


def _edit_table(
    rows: list[EditMap], n_latents: int, max_activations: Mapping[int, float] | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(edited latents [m], set mask [B, m], set values [B, m], [scale, add] [2, B, m]) of per-row edits."""
    latents = sorted({int(j) for row in rows for j in row})
    bad = [j for j in latents if not 0 <= j < n_latents]
    if bad:
        raise ValueError(f"edited latents {bad} are not in the SAE's 0..{n_latents - 1}")
    column = {j: i for i, j in enumerate(latents)}
    shape = (len(rows), len(latents))
    is_set, set_to = torch.zeros(shape, dtype=torch.bool), torch.zeros(shape)
    scale, add = torch.ones(shape), torch.zeros(shape)
    for b, row in enumerate(rows):
        for j, edit in row.items():
            edit = edit if isinstance(edit, Edit) else Edit("set", float(edit))
            unit = 1.0
            if max_activations is not None and edit.op != "scale":
                try:
                    unit = float(max_activations[int(j)])
                except (KeyError, IndexError):
                    raise ValueError(f"no maximum activation is known for latent {j}") from None
            i = column[int(j)]
            if edit.op == "set":
                is_set[b, i], set_to[b, i] = True, edit.value * unit
            elif edit.op == "add":
                add[b, i] = edit.value * unit
            else:
                scale[b, i] = edit.value
    return torch.tensor(latents, dtype=torch.long), is_set, set_to, torch.stack([scale, add])


def _token_index(tokens: str | Sequence[int], n_tokens: int) -> torch.Tensor:
    if isinstance(tokens, str):
        if tokens not in TOKENS:
            raise ValueError(f"tokens={tokens!r}: use one of {TOKENS} or a list of token indices")
        start, stop = {"all": (0, n_tokens), "cls": (0, 1), "patches": (1, n_tokens)}[tokens]
        return torch.arange(start, stop)
    index = torch.tensor(list(tokens), dtype=torch.long)
    if len(index) == 0 or int(index.min()) < -n_tokens or int(index.max()) >= n_tokens:
        raise ValueError(f"token indices {list(tokens)} are not all within the output's {n_tokens} tokens")
    return index % n_tokens


def _batch_first(model: torch.nn.Module, hook_point: str) -> bool:
    """open_clip towers built with batch_first=False run their blocks as [tokens, B, d]."""
    if ".resblocks." not in hook_point:
        return True
    return getattr(model.get_submodule(hook_point.rsplit(".resblocks.", 1)[0]), "batch_first", True)


def _sae_device_dtype(sae: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = sae.W_dec_fd
    return weight.device, weight.dtype


@torch.no_grad()
def steer_rows(
    sae,
    x_bnd: torch.Tensor,
    edits: list[EditMap],
    mode: str = "delta",
    max_activations: Mapping[int, float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Edited activations for rows x_bnd [B, n, d] (n tokens each), row b edited by edits[b].

    The rows are encoded in the SAE's dtype and the result is cast back to x's dtype; in delta
    mode a row without edits is returned as it was.
    """
    device, dtype = _sae_device_dtype(sae)
    B, n, d = x_bnd.shape
    latents_m, is_set_bm, set_to_bm, scale_add_2bm = _edit_table(edits, sae.config.n_latents, max_activations)
    edited_b = torch.tensor([len(row) > 0 for row in edits])
    x_nd = x_bnd.reshape(B * n, d).to(device, dtype)
    z = sae.encode_sparse(x_nd)
    # the edited latents' current values, [B*n, m], read from the sparse codes
    z_nm = torch.zeros(B * n, len(latents_m), device=device, dtype=dtype)
    hit = z.indices_n[:, None] == latents_m.to(device)[None, :]
    rows, cols = hit.nonzero(as_tuple=True)
    z_nm[z.rows_n[rows], cols] = z.values_n[rows].to(dtype)

    def per_token(t_bm: torch.Tensor) -> torch.Tensor:
        return t_bm.to(device).repeat_interleave(n, dim=0)

    scale_nm, add_nm = per_token(scale_add_2bm[0]), per_token(scale_add_2bm[1])
    new_nm = torch.where(per_token(is_set_bm), per_token(set_to_bm).to(dtype), z_nm * scale_nm + add_nm)
    directions_md = _decoder_directions(sae, latents_m.to(device))
    change_nd = (new_nm - z_nm) @ directions_md
    out_nd = x_nd + change_nd if mode == "delta" else sae.decode(z.to_dense()) + change_nd
    out_bnd = out_nd.reshape(B, n, d).to(x_bnd.device, x_bnd.dtype)
    if mode == "delta":  # rows without edits stay bit for bit what they were
        out_bnd = torch.where(edited_b.to(x_bnd.device)[:, None, None], out_bnd, x_bnd)
    return out_bnd


def _decoder_directions(sae, latents_m: torch.Tensor) -> torch.Tensor:
    """decode(e_j) - decode(0) for each edited latent j: what one unit of it adds (any linear decoder)."""
    one_hot_mf = torch.zeros(len(latents_m), sae.config.n_latents, device=latents_m.device)
    one_hot_mf[torch.arange(len(latents_m)), latents_m] = 1.0
    one_hot_mf = one_hot_mf.to(_sae_device_dtype(sae)[1])
    return sae.decode(one_hot_mf) - sae.decode(torch.zeros_like(one_hot_mf[:1]))


@contextlib.contextmanager
def steered(
    model: torch.nn.Module,
    hook_point: str,
    sae,
    edits: EditMap | Sequence[EditMap],
    *,
    mode: Literal["delta", "reconstruction"] = "delta",
    tokens: str | Sequence[int] = "all",
    max_activations: Mapping[int, float] | torch.Tensor | None = None,
) -> Iterator[None]:
    """While open, the output of `model.get_submodule(hook_point)` is steered through `sae`.

    `edits`: one `{latent: value | Edit}` for every row, or a list with one map per batch row.
    `tokens`: "all", "cls" (token 0), "patches" (all but token 0) or token indices; a [B, d]
    output has one vector per row, which is edited whole. The SAE runs in eval mode (BatchTopK
    then uses its per-row threshold, so a row's edit does not depend on its batch). The hook is
    removed on exit, also after an exception.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    try:
        module = model.get_submodule(hook_point)
    except AttributeError:
        raise ValueError(f"hook point {hook_point!r} is not a module of {type(model).__name__}") from None
    per_row = not isinstance(edits, Mapping)
    rows = [dict(row) for row in edits] if per_row else None
    latents = {int(j) for row in (rows or [edits]) for j in row}
    _edit_table([dict.fromkeys(latents, 0.0)], sae.config.n_latents, None)  # fail here, not mid-forward
    batch_first = _batch_first(model, hook_point)

    def hook(_module, _inputs, output):
        rest = ()
        if isinstance(output, tuple):
            output, *rest = output
        if output.shape[-1] != sae.config.d_in:
            raise ValueError(
                f"{hook_point!r} outputs width {output.shape[-1]}, but the SAE has d_in={sae.config.d_in}: "
                "steer at the layer the SAE was trained on"
            )
        h_btd = output[:, None] if output.ndim == 2 else output if batch_first else output.transpose(0, 1)
        B = h_btd.shape[0]
        if per_row and len(rows) != B:
            raise ValueError(f"{len(rows)} per-row edit maps for a batch of {B} rows")
        if mode == "delta" and not latents:
            return None  # nothing to edit: the output is left exactly as it is
        index = torch.arange(1) if output.ndim == 2 else _token_index(tokens, h_btd.shape[1])
        index = index.to(h_btd.device)
        h_btd = h_btd.clone()
        h_btd[:, index] = steer_rows(sae, h_btd[:, index], rows or [edits] * B, mode, max_activations)
        steered_out = h_btd[:, 0] if output.ndim == 2 else h_btd if batch_first else h_btd.transpose(0, 1)
        return (steered_out, *rest) if rest else steered_out

    was_training = sae.training
    sae.eval()
    # prepend: later hooks (transformers records hidden states with forward hooks) see the edit
    handle = module.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()
        sae.train(was_training)
