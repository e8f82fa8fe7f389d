"""From a hook point's output to activation rows: the token modes.

A hook point gives either a sequence ([B, T, d]: a block's residual stream, a final norm) or one
vector per item ([B, d]: an embedding, a projection). A sequence contributes rows by the token
mode (`TokenConfig`); a vector is one row per item with token index -1 whatever the mode.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch

from vlsae_ray.config import TokenConfig


class Activations(NamedTuple):
    """The rows one hook point gives for a batch of items."""

    values: torch.Tensor  # [R, d] float32, CPU
    item: torch.Tensor  # [R] int64: index within the batch of the item each row came from
    token: torch.Tensor  # [R] int32: token position in that item's sequence; -1 for a pooled row


class HookOutput(NamedTuple):
    """A hook point's raw output for a batch, with what the token modes need to read it."""

    x: torch.Tensor  # [B, T, d] a sequence, or [B, d] one vector per item
    real_bt: torch.Tensor | None = None  # [B, T] bool: the item's real tokens (not padding); None: all
    cls_b: torch.Tensor | None = None  # [B] the position the model itself pools ('cls'); None: token 0


def item_seed(seed: int, item_id: str) -> int:
    """The seed of one item's random-token draw: a function of (seed, item id) only, so an item gets
    the same tokens in any batch, on any worker, in any rerun."""
    digest = hashlib.sha256(f"{seed}\x00{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def select_rows(output: HookOutput, item_ids: list[str], token: TokenConfig) -> Activations:
    """The rows of `output` under `token`, as float32 on the CPU: item by item, in batch order."""
    x = output.x.detach().float().cpu()
    n_items = x.shape[0]
    if x.ndim == 2:
        return Activations(x, torch.arange(n_items), torch.full((n_items,), -1, dtype=torch.int32))
    real_bt = torch.ones(x.shape[:2], dtype=torch.bool) if output.real_bt is None else output.real_bt.cpu()
    if token.mode == "mean":
        mean_bd = (x * real_bt[..., None]).sum(1) / real_bt.sum(1, keepdim=True)
        return Activations(mean_bd, torch.arange(n_items), torch.full((n_items,), -1, dtype=torch.int32))
    if token.mode == "cls":
        cls_b = torch.zeros(n_items, dtype=torch.long) if output.cls_b is None else output.cls_b.cpu().long()
        return Activations(x[torch.arange(n_items), cls_b], torch.arange(n_items), cls_b.int())
    if token.mode == "all":
        item_r, token_r = real_bt.nonzero(as_tuple=True)  # row-major: item by item, tokens in order
        return Activations(x[item_r, token_r], item_r, token_r.int())
    # random: k distinct real positions per item (all of them when it has fewer), in order
    items, tokens = [], []
    for b, item_id in enumerate(item_ids):
        positions = real_bt[b].nonzero().squeeze(1)
        generator = torch.Generator().manual_seed(item_seed(token.seed, item_id))
        drawn = positions[torch.randperm(len(positions), generator=generator)[: token.k]].sort().values
        items.append(torch.full_like(drawn, b))
        tokens.append(drawn)
    item_r, token_r = torch.cat(items), torch.cat(tokens)
    return Activations(x[item_r, token_r], item_r, token_r.int())
