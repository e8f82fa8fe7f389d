"""Single-process SAE training on an in-memory tensor (notebooks, tests, small runs)."""

from __future__ import annotations

import math

import torch

from vlsae_ray.sae import SparseAutoencoder
from vlsae_ray.train.step import SAETrainer


def fit_local(
    sae: SparseAutoencoder,
    activations: torch.Tensor,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    init_samples: int = 8192,
    modality: torch.Tensor | None = None,
    **options,
) -> dict[str, float]:
    """Train `sae` in place on `activations` [N, d] with the same `SAETrainer` step as Ray Train.

    Each epoch visits the rows in a fresh order (torch.Generator seeded by `seed`); the
    data-dependent init uses `init_samples` rows drawn with the same generator (0: no data init).
    `modality` ([N] bool, True = text rows) is for a VL-SAE, whose rows may be paired or not.
    `options` go to `SAETrainer` (lr, warmup_steps, decay_fraction, grad_clip, dead_tokens_threshold,
    precision: "fp32", "tf32" or "bf16").
    Returns the final step's metrics (`loss`, `fvu`, `l0`, `dead_fraction`, `lr` and the loss
    terms) plus `steps` and `samples`, the number of optimisation steps and of samples seen.
    """
    if activations.ndim != 2 or activations.shape[1] != sae.config.d_in:
        raise ValueError(
            f"activations have shape {tuple(activations.shape)}; expected [N, {sae.config.d_in}]"
        )
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size={batch_size} and epochs={epochs} must both be at least 1")
    n = activations.shape[0]
    generator = torch.Generator().manual_seed(seed)
    if modality is not None and modality.shape != (n,):
        raise ValueError(f"modality has shape {tuple(modality.shape)}; expected [{n}], one flag per row")
    init_rows = torch.randperm(n, generator=generator)[:init_samples] if init_samples else None
    trainer = SAETrainer(
        sae,
        total_steps=epochs * math.ceil(n / batch_size),
        sample=None if init_rows is None else activations[init_rows],
        sample_modality=None if init_rows is None or modality is None else modality[init_rows],
        **options,
    )
    metrics: dict[str, float] = {}
    samples = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            rows_b = order[start : start + batch_size]
            batch_bd = activations[rows_b]
            metrics = trainer.step(batch_bd, None if modality is None else modality[rows_b])
            samples += batch_bd.shape[0]
    return {**metrics, "steps": trainer.steps, "samples": samples}
