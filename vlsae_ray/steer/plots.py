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
    axes[0][0].set_ylabel("flip rate (solid), hold rate on known attributes (dashed)")
    axes[0][-1].legend(fontsize=7, loc="center right", title="attribute (latents)", title_fontsize=7)
    fig.tight_layout()
    return to_png(fig)


def examples(rows: list[dict], latents, summary: dict, n: int = 6) -> bytes:
    """Held-out images with the unsteered and the steered prediction of the clamped latent's attribute,
    for the most steerable colour and shape latents, at their attribute's best delta-mode strength."""
    from vlsae_ray.steer.measure import probe_image

    steerability = summary["steerability"]
    chosen = sorted(
        (c for c in latents if c.attribute in ("colour", "shape")),
        key=lambda c: -steerability.get(c.latent, 0.0),
    )[:n]
    panels = []
    for concept in chosen:
        best = summary["best"].get(f"{concept.attribute}/delta") or next(
            p for k, p in summary["best"].items() if k.startswith(concept.attribute)
        )
        mine = [r for r in rows if r["latent"] == concept.latent and r["kind"] == "flip"]
        steered = [r for r in mine if r["mode"] == "delta" and r["strength"] == best["strength"]]
        if not steered:
            continue
        row = steered[0]
        before = next(r for r in mine if r["mode"] == "none" and r["item"] == row["item"])
        panels.append((concept, row, json.loads(before["predicted"]), json.loads(row["predicted"])))
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
