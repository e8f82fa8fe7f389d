"""Single-process SAE training on an in-memory tensor (notebooks, tests, small runs), or on a stored
dataset with exactly the batches of a `vlsae train` run."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from vlsae_ray.sae import SparseAutoencoder
from vlsae_ray.train.step import SAETrainer

# each step's (x_bd, modality_b: True = text rows, or None, items in the batch)
Steps = Iterator[tuple[torch.Tensor, torch.Tensor | None, int]]


def fit_local(
    sae: SparseAutoencoder,
    activations: torch.Tensor | str,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    init_samples: int = 8192,
    modality: torch.Tensor | None = None,
    text_activations: str | None = None,
    paired: bool = True,
    window_shards: int = 4,
    parts: int = 1,
    **options,
) -> dict[str, float]:
    """Train `sae` in place on `activations` with the same `SAETrainer` step as Ray Train.

    `activations` [N, d] in memory: each epoch visits the rows in a fresh order (torch.Generator
    seeded by `seed`); the data-dependent init uses `init_samples` rows drawn with the same
    generator (0: no data init). `modality` ([N] bool, True = text rows) is for a VL-SAE, whose
    rows may be paired or not.

    `activations` a dataset URI: the batches and the init sample are those of `vlsae train` with
    the same batch_size, seed, window_shards, `text_activations` (a VL-SAE's text side), `paired`
    and `parts` data-parallel workers: every part's `ActivationStream` batch of a step together,
    as one batch, so one process reproduces a distributed run. The stream reads through Ray Data.

    `options` go to `SAETrainer` (lr, warmup_steps, decay_fraction, grad_clip, dead_tokens_threshold,
    precision: "fp32", "tf32" or "bf16").
    Returns the final step's metrics (`loss`, `fvu`, `l0`, `dead_fraction`, `lr` and the loss
    terms) plus `steps` and `samples`, the number of optimisation steps and of samples seen (of
    items for a dataset URI, as `vlsae train` counts them).
    """
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size={batch_size} and epochs={epochs} must both be at least 1")
    if isinstance(activations, str):
        if modality is not None:
            raise ValueError(
                "modality is for in-memory rows; name a dataset's text side with text_activations"
            )
        from vlsae_ray.activations.reader import ActivationStream, check_training_data

        check_training_data(sae.config.d_in, activations, text_activations, paired)
        streams = [
            ActivationStream(
                activations,
                batch_size=batch_size,
                seed=seed,
                window_shards=window_shards,
                part=part,
                parts=parts,
                text_dataset=text_activations,
            )
            for part in range(parts)
        ]
        sample, sample_modality = streams[0].init_sample(init_samples) if init_samples else (None, None)
        total_steps = sum(streams[0].steps_in_epoch(epoch) for epoch in range(epochs))
        steps = _stream_steps(streams, epochs, batch_size)
    else:
        if text_activations is not None or parts != 1:
            raise ValueError("text_activations and parts go with a dataset URI; in memory, pass modality")
        sample, sample_modality, total_steps, steps = _in_memory(
            sae, activations, modality, batch_size, epochs, seed, init_samples
        )
    trainer = SAETrainer(
        sae, total_steps=total_steps, sample=sample, sample_modality=sample_modality, **options
    )
    metrics: dict[str, float] = {}
    samples = 0
    for x_bd, modality_b, items in steps:
        metrics = trainer.step(x_bd, modality_b)
        samples += items
    return {**metrics, "steps": trainer.steps, "samples": samples}


def _in_memory(sae, activations, modality, batch_size, epochs, seed, init_samples):
    """(init sample, its modality, total steps, steps) of a tensor's seeded shuffles."""
    if activations.ndim != 2 or activations.shape[1] != sae.config.d_in:
        raise ValueError(
            f"activations have shape {tuple(activations.shape)}; expected [N, {sae.config.d_in}]"
        )
    n = activations.shape[0]
    if modality is not None and modality.shape != (n,):
        raise ValueError(f"modality has shape {tuple(modality.shape)}; expected [{n}], one flag per row")
    generator = torch.Generator().manual_seed(seed)
    init_rows = torch.randperm(n, generator=generator)[:init_samples] if init_samples else None

    def steps() -> Steps:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                rows_b = order[start : start + batch_size]
                yield activations[rows_b], None if modality is None else modality[rows_b], len(rows_b)

    return (
        None if init_rows is None else activations[init_rows],
        None if init_rows is None or modality is None else modality[init_rows],
        epochs * math.ceil(n / batch_size),
        steps(),
    )


def _stream_steps(streams: list, epochs: int, batch_size: int) -> Steps:
    """The data-parallel parts' batches of each step as one batch (their modality flags in turn)."""
    modality_b = None if streams[0].modality_b is None else streams[0].modality_b.repeat(len(streams))
    for epoch in range(epochs):
        for part_batches in zip(*(stream.epoch(epoch) for stream in streams), strict=True):
            yield torch.cat(part_batches), modality_b, batch_size
