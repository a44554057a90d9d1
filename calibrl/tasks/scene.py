"""Scenes (plain JSON-able dicts) and their PIL rendering on a small RGB canvas.

A scene is `{"size": 112, "shapes": [...], "texts": [...], "polygon": {...}}` (every key but "size" optional):
- shape: `{"kind": "circle"|"square"|"triangle", "color": COLOR, "size": side_px, "x": cx, "y": cy}`; `size` is the
  side of the shape's bounding box, (x, y) its centre.
- text: `{"text": str, "x": cx, "y": cy, "size": font_px}` drawn in black, centred.
- polygon: `{"points": [[x, y], ...], "labels": [str, ...]}` drawn as a black outline with labelled vertices.
"""
from __future__ import annotations

import random
from typing import Any

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 0),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
CANVAS = 112
# Area of a shape as a fraction of its bounding box (used to keep "biggest" unambiguous).
AREA_FACTOR = {"circle": 0.785, "square": 1.0, "triangle": 0.5}


def shape_area(shape: dict[str, Any]) -> float:
    """Drawn area in px^2 of a scene shape."""
    return AREA_FACTOR[shape["kind"]] * shape["size"] ** 2


def place_boxes(rng: random.Random, sizes: list[int], *, canvas: int = CANVAS, margin: int = 4,
                gap: int = 6) -> list[tuple[int, int]]:
    """Centres for square boxes of the given sides, inside the canvas and `gap` px apart (rejection sampling)."""
    for _ in range(200):
        centres: list[tuple[int, int]] = []
        for s in sizes:
            lo, hi = margin + s // 2 + 1, canvas - margin - s // 2 - 1
            for _ in range(200):
                x, y = rng.randint(lo, hi), rng.randint(lo, hi)
                if all(abs(x - cx) * 2 >= s + cs + 2 * gap or abs(y - cy) * 2 >= s + cs + 2 * gap
                       for (cx, cy), cs in zip(centres, sizes)):
                    centres.append((x, y))
                    break
            else:
                break
        if len(centres) == len(sizes):
            return centres
    raise RuntimeError(f"place_boxes: could not place boxes of sides {sizes} on a {canvas}px canvas")


def _draw_shape(draw: Any, sh: dict[str, Any]) -> None:
    x, y, h = sh["x"], sh["y"], sh["size"] / 2
    fill = COLORS[sh["color"]]
    if sh["kind"] == "circle":
        draw.ellipse([x - h, y - h, x + h, y + h], fill=fill)
    elif sh["kind"] == "square":
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    elif sh["kind"] == "triangle":
        draw.polygon([(x, y - h), (x - h, y + h), (x + h, y + h)], fill=fill)
    else:
        raise ValueError(f"scene.shapes: unknown kind {sh['kind']!r}; expected one of {KINDS}")


def render(scene: dict[str, Any]) -> Any:
    """Draw a scene dict (see module docstring) on a white RGB canvas and return the PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    if not isinstance(scene, dict):
        raise ValueError(f"scene: expected a dict, got {type(scene).__name__}")
    size = scene.get("size", CANVAS)
    if not isinstance(size, int) or not 28 <= size <= 1024:
        raise ValueError(f"scene['size']: expected an int in [28, 1024], got {size!r}")
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for sh in scene.get("shapes", []):
        if sh.get("color") not in COLORS:
            raise ValueError(f"scene.shapes: unknown color {sh.get('color')!r}; expected one of {sorted(COLORS)}")
        _draw_shape(draw, sh)
    poly = scene.get("polygon")
    if poly:
        pts = [tuple(p) for p in poly["points"]]
        draw.polygon(pts, outline=(0, 0, 0), width=2)
        font = ImageFont.load_default(size=11)
        cx, cy = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
        for (px, py), lab in zip(pts, poly.get("labels", [])):
            dx, dy = px - cx, py - cy
            norm = max(1e-6, (dx * dx + dy * dy) ** 0.5)
            draw.text((px + 7 * dx / norm, py + 7 * dy / norm), lab, fill=(200, 0, 0), font=font, anchor="mm")
    for t in scene.get("texts", []):
        font = ImageFont.load_default(size=t.get("size", 40))
        draw.text((t["x"], t["y"]), str(t["text"]), fill=(0, 0, 0), font=font, anchor="mm")
    return img


def size_word(side: int) -> str:
    """Expert-style size word for a bounding-box side in px."""
    return "small" if side < 18 else "medium" if side < 26 else "large" if side < 34 else "very large"


def where_word(y: int, canvas: int = CANVAS) -> str:
    """Expert-style vertical position phrase."""
    return "near the top" if y < canvas / 3 else "in the middle" if y < 2 * canvas / 3 else "near the bottom"


def left_to_right(shapes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shapes sorted by centre x (then y)."""
    return sorted(shapes, key=lambda s: (s["x"], s["y"]))
