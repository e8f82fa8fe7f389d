"""The evaluate report's PNG plots (matplotlib, Agg backend), each returned as PNG bytes.

Every figure has a fixed size in inches at `DPI`, so its pixel size is known (`figure_pixels`).
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on a cluster worker
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
PLOT_SIZE = (6.4, 4.0)  # inches: 640 x 400 pixels
THUMB = 1.2  # inches per top image


def to_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()


def grid_size(n_latents: int, n_images: int) -> tuple[float, float]:
    """Inches of a top-image grid: one row per latent, a label column, one column per image."""
    return (THUMB * n_images + 1.6, THUMB * n_latents + 0.5)


def figure_pixels(size: tuple[float, float]) -> tuple[int, int]:
    return round(size[0] * DPI), round(size[1] * DPI)


def ms_histogram(ms_latents: np.ndarray, ms_neurons: np.ndarray) -> bytes:
    """Distribution of the MS of SAE latents and of the layer's raw neurons (NaNs left out)."""
    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    bins = np.linspace(0, 1, 41)
    for scores, label in ((ms_neurons, "raw neurons"), (ms_latents, "SAE latents")):
        finite = scores[np.isfinite(scores)]
        ax.hist(finite, bins=bins, alpha=0.6, density=True, label=f"{label} (n={finite.size})")
    ax.set_xlabel("Monosemanticity Score")
    ax.set_ylabel("density")
    ax.set_title("MS of SAE latents vs raw neurons")
    ax.legend()
    fig.tight_layout()
    return to_png(fig)


def reliability(rows: list[tuple[float, float, int, float, float]]) -> bytes:
    """A reliability diagram: per confidence bin (low, high, names, mean confidence, share right), the
    share of names that are right against their mean confidence; the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
    ax.plot([r[3] for r in rows], [r[4] for r in rows], "o-", label="names")
    for _, _, count, mean, share in rows:
        ax.annotate(f"n={count}", (mean, share), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (mean over the bin)")
    ax.set_ylabel("share of names right (ground truth)")
    ax.set_title("Reliability of latent names")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return to_png(fig)


def fvu_vs_l0(points: list[tuple[str, float, float]]) -> bytes:
    """One point per checkpoint: (label, L0, FVU)."""
    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    ax.plot([p[1] for p in points], [p[2] for p in points], "o")
    for label, l0_value, fvu_value in points:
        ax.annotate(label, (l0_value, fvu_value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("L0 (active latents per sample)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title("FVU vs L0 across checkpoints")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return to_png(fig)


def matryoshka_groups(group_ends: list[int], prefix_fvu: list[float]) -> bytes:
    """FVU of each nested prefix's own reconstruction (groups 1, 1-2, ..., all)."""
    fig, ax = plt.subplots(figsize=PLOT_SIZE)
    ax.plot(group_ends, prefix_fvu, "o-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(group_ends, [str(end) for end in group_ends])
    ax.minorticks_off()
    ax.set_xlabel("latents in the prefix (cumulative groups)")
    ax.set_ylabel("FVU of the prefix's reconstruction")
    ax.set_title("Matryoshka: FVU per nested group")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return to_png(fig)


def top_image_grid(rows: list[tuple[str, list]], n_images: int) -> bytes:
    """rows: (label, top images as PIL images, largest first); one grid row per latent."""
    fig, axes = plt.subplots(len(rows), n_images + 1, figsize=grid_size(len(rows), n_images), squeeze=False)
    for (label, images), row_axes in zip(rows, axes, strict=True):
        row_axes[0].text(0.5, 0.5, label, ha="center", va="center", fontsize=8, wrap=True)
        for ax in row_axes:
            ax.axis("off")
        for ax, image in zip(row_axes[1:], images, strict=False):
            ax.imshow(np.asarray(image.convert("RGB")))
    fig.suptitle("Top images of the highest-MS latents")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.4 / grid_size(len(rows), n_images)[1])
    return to_png(fig)
