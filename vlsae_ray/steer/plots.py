"""The steering report's PNGs: flip and hold rates against strength, and example answers."""

from __future__ import annotations

import json

import numpy as np

from vlsae_ray.eval.plots import THUMB, plt, to_png


def flip_vs_strength(summary: dict) -> bytes:
    """One panel per mode: each attribute's flip rate (solid) and hold rate on known attributes
    (dashed) against the clamp strength, mean over its latents with the spread shaded."""
    modes = sorted({mode for by_mode in summary["curves"].values() for mode in by_mode})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.0), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10")
    for ax, mode in zip(axes[0], modes, strict=True):
        for i, (attribute, by_mode) in enumerate(sorted(summary["curves"].items())):
            points = by_mode.get(mode, [])
            if not points:
                continue
            x = np.array([p["strength"] for p in points])
            flip = np.array([p["flip"] for p in points])
            hold = np.array([p["hold_known"][0] for p in points])
            label = f"{attribute} ({points[0]['latents']})"
            ax.plot(x, flip[:, 0], "-o", color=colours(i), label=label, markersize=3)
            ax.fill_between(x, flip[:, 0] - flip[:, 1], flip[:, 0] + flip[:, 1], color=colours(i), alpha=0.12)
            ax.plot(x, hold, "--", color=colours(i), linewidth=1)
        ax.axhline(summary["goal"]["flip"], color="gray", linewidth=0.6)
        ax.axhline(summary["goal"]["hold"], color="gray", linewidth=0.6, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clamp strength (x the latent's maximum activation)")
        ax.set_title(f"{mode} mode")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("flip rate (solid), hold rate on known attributes (dashed)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, title="attribute (latents)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return to_png(fig)


def examples(rows: list[dict], latents, summary: dict, n: int = 6) -> bytes:
    """Held-out images with the unsteered and the steered prediction of the clamped latent's attribute,
    for the most steerable colour and shape latents, each at the weakest delta-mode strength that
    flips one of its images (else its strongest)."""
    from vlsae_ray.steer.measure import probe_image

    steerability = summary["steerability"]
    chosen = sorted(
        (c for c in latents if c.attribute in ("colour", "shape")),
        key=lambda c: -steerability.get(c.latent, 0.0),
    )[:n]
    panels = []
    for concept in chosen:
        mine = [r for r in rows if r["latent"] == concept.latent and r["kind"] == "flip"]
        before = {r["item"]: json.loads(r["predicted"]) for r in mine if r["mode"] == "none"}
        steered = sorted((r for r in mine if r["mode"] == "delta"), key=lambda r: r["strength"])
        if not steered:
            continue
        flipped = [r for r in steered if json.loads(r["predicted"])[concept.attribute] == concept.value]
        row = (flipped or steered[-1:])[0]
        panels.append((concept, row, before[row["item"]], json.loads(row["predicted"])))
    fig, axes = plt.subplots(
        1, max(len(panels), 1), figsize=(THUMB * 1.9 * max(len(panels), 1), 2.9), squeeze=False
    )
    for ax, (concept, row, before, after) in zip(axes[0], panels, strict=False):
        ax.imshow(probe_image(row["item"]))
        a = concept.attribute
        ax.set_title(
            f"latent {concept.latent}: {a}={concept.value}\nx{row['strength']:g} max, delta", fontsize=7
        )
        ax.set_xlabel(f"{a}: {before[a] or '?'} -> {after[a] or '?'}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if not panels:
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, "no colour or shape latents measured", ha="center", va="center")
    fig.tight_layout()
    return to_png(fig)
