"""Draw a world scene with numpy and PIL: a background and `count` patterned copies of one shape.

All geometry scales with the image side, so any `image_size` renders the same scene; every random
choice comes from the generator passed in, so a scene is a pure function of its labels and rng.
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUND_GRAY = {"black": 10, "gray": 90}
NOISE_RANGE = (0, 110)  # gray noise only, so the background never carries an object colour
COLOUR_JITTER = 12  # per channel, so colour is a region of RGB space rather than one value
PATTERN_SHADE = 0.8  # the second tone of a pattern is the object colour darkened by this factor;
# darker tones merge with the background and blur the outline, and with it the shape

RADIUS = {"small": 0.1, "large": 0.125}  # fraction of the image side
EXTENT = 1.15  # every outline lies within EXTENT * radius of its centre
GAP = 0.025  # between neighbouring copies, as a fraction of the image side
GROUP_CENTRE = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
COUNTS = {"one": 1, "two": 2, "three": 3}


@dataclass(frozen=True)
class Scene:
    pixels: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # bool [H, W], True on object pixels


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices for every shape except the circle, rotated by `angle` radians."""
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(1.15 * math.sin(t), -1.15 * math.cos(t)) for t in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = 1.15 if i % 2 == 0 else 0.48
            t = i * math.pi / 5
            pts.append((rad * math.sin(t), -rad * math.cos(t)))
    elif shape == "cross":
        a, w = 1.0, 0.36
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
               (-a, -w), (-w, -w)]  # fmt: skip
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = 13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)
        pts = [(x / 15.0, -(y + 2.5) / 15.0) for x, y in zip(xs, ys, strict=True)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in pts]


def _shape_mask(shape: str, side: int, centres: list[tuple[float, float]], r: float, angle: float):
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    for cx, cy in centres:
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon(_outline(shape, cx, cy, r, angle), fill=255)
    return np.asarray(canvas) > 0


def _pattern(pattern: str, side: int, period: float, phase: tuple[float, float]) -> np.ndarray:
    """Boolean [H, W] map: True where a patterned object shows its base colour."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    x, y = x + phase[0], y + phase[1]
    if pattern == "solid":
        return np.ones((side, side), bool)
    if pattern == "striped":
        return ((x + y) // period) % 2 == 0
    if pattern == "checkered":
        return ((x // period) + (y // period)) % 2 == 0
    if pattern == "dotted":  # dark dots on the base colour
        q = 1.6 * period
        dx, dy = (x % q) - q / 2, (y % q) - q / 2
        return dx * dx + dy * dy > (0.3 * q) ** 2
    raise ValueError(f"unknown pattern {pattern!r}")


def _centres(position: str, n: int, side: int, r: float, rng: np.random.Generator):
    """Centres of `n` copies in a row (top/bottom/centre) or column (left/right) around `position`.

    The group is shifted as a whole to stay inside the image, so copies never touch.
    """
    step = 2 * EXTENT * r + GAP * side
    along_half = (n - 1) / 2 * step + EXTENT * r
    gx, gy = GROUP_CENTRE[position]
    jitter = rng.uniform(-0.03, 0.03, size=2) * side
    vertical = position in ("left", "right")
    along = (gy if vertical else gx) * side + jitter[0]
    across = (gx if vertical else gy) * side + jitter[1]
    along = float(np.clip(along, along_half, side - along_half))
    across = float(np.clip(across, EXTENT * r, side - EXTENT * r))
    offsets = [along + (i - (n - 1) / 2) * step for i in range(n)]
    return [(across, o) if vertical else (o, across) for o in offsets]


def render_scene(labels: dict[str, str], side: int, rng: np.random.Generator) -> Scene:
    """Render the scene that `labels` describe at `side` x `side` pixels."""
    background = labels["background"]
    if background == "noise":
        gray = rng.integers(*NOISE_RANGE, size=(side, side, 1), endpoint=True)
        pixels = np.repeat(gray, 3, axis=2).astype(np.uint8)
    else:
        pixels = np.full((side, side, 3), BACKGROUND_GRAY[background], np.uint8)

    base = np.array(PALETTE[labels["colour"]]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    base = np.clip(base, 0, 255)
    r = RADIUS[labels["size"]] * side * rng.uniform(0.95, 1.05)
    angle = 0.0 if labels["shape"] == "circle" else rng.uniform(-0.25, 0.25)
    centres = _centres(labels["position"], COUNTS[labels["count"]], side, r, rng)
    mask = _shape_mask(labels["shape"], side, centres, r, angle)

    period = max(2.0, side / 20)
    lit = _pattern(labels["pattern"], side, period, tuple(rng.uniform(0, 2 * period, size=2)))
    shade = (base * PATTERN_SHADE).astype(np.uint8)
    pixels[mask & lit] = base.astype(np.uint8)
    pixels[mask & ~lit] = shade
    return Scene(pixels=pixels, mask=mask)
