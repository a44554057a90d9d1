"""Built-in procedural task families (PIL-drawn, no optional dependencies), easiest first.

Each generator takes a seeded `random.Random` and returns a dict with `scene` (see scene.py), `question` (without
the format instruction), `answer` (str), `expert` (long expert chain of thought, full sentences, shapes enumerated
left to right) and `policy` (the short style the SFT warm start teaches). The answer is drawn first, uniformly, so
answer distributions are balanced.
"""
from __future__ import annotations

import random
from typing import Any

from calibrl.tasks.scene import (CANVAS, COLORS, KINDS, left_to_right, place_boxes, shape_area, size_word,
                                 where_word)

COLOR_NAMES = tuple(COLORS)  # ("red", "green", "blue", "yellow")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


def _describe(sh: dict[str, Any]) -> str:
    return f"a {size_word(sh['size'])} {sh['color']} {sh['kind']} {where_word(sh['y'])}"


def _enumerate(shapes: list[dict[str, Any]]) -> str:
    parts = [_describe(s) for s in left_to_right(shapes)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def gen_color(rng: random.Random) -> dict[str, Any]:
    """Level 1: one shape; question: its colour."""
    color = rng.choice(COLOR_NAMES)
    side = rng.choice((22, 30, 38))
    (x, y), = place_boxes(rng, [side])
    sh = {"kind": rng.choice(KINDS), "color": color, "size": side, "x": x, "y": y}
    expert = (f"There is exactly one shape in the image: {_describe(sh)}. Its fill colour is clearly {color}, "
              f"and there is nothing else to compare it with, so the colour of the shape is {color}.")
    return {"scene": {"size": CANVAS, "shapes": [sh]}, "question": "What is the colour of the shape?",
            "answer": color, "expert": expert, "policy": f"{color} {sh['kind']}"}


def gen_biggest_color(rng: random.Random) -> dict[str, Any]:
    """Level 2 (the prototype's task): 3 shapes with distinct colours and sides; colour of the biggest.

    "Biggest" is the largest bounding box; kinds are resampled until it also has the largest drawn area.
    """
    colors = rng.sample(COLOR_NAMES, 3)
    sides = rng.sample((14, 22, 30, 38), 3)
    while True:
        kinds = [rng.choice(KINDS) for _ in range(3)]
        shapes = [{"kind": k, "color": c, "size": s, "x": 0, "y": 0} for k, c, s in zip(kinds, colors, sides)]
        big = max(shapes, key=lambda s: s["size"])
        if all(shape_area(big) > shape_area(s) for s in shapes if s is not big):
            break
    for sh, (x, y) in zip(shapes, place_boxes(rng, sides)):
        sh["x"], sh["y"] = x, y
    by_size = sorted(shapes, key=lambda s: -s["size"])
    expert = (f"I see three shapes. From left to right: {_enumerate(shapes)}. Comparing their sizes, the largest "
              f"one is the {big['color']} {big['kind']}, so the biggest shape is {big['color']}.")
    return {"scene": {"size": CANVAS, "shapes": shapes}, "question": "What is the colour of the biggest shape?",
            "answer": big["color"], "expert": expert, "policy": " > ".join(s["color"] for s in by_size)}


def gen_count(rng: random.Random) -> dict[str, Any]:
    """Level 3: 1-4 shapes (colours may repeat); question: how many shapes."""
    n = rng.randint(1, 4)
    sides = [rng.choice((14, 18, 22, 26)) for _ in range(n)]
    shapes = [{"kind": rng.choice(KINDS), "color": rng.choice(COLOR_NAMES), "size": s, "x": x, "y": y}
              for s, (x, y) in zip(sides, place_boxes(rng, sides, gap=8))]
    noun = "shape" if n == 1 else "shapes"
    expert = (f"Scanning the image from left to right, I find {_enumerate(shapes)}. Counting them one by one gives "
              f"{NUMBER_WORDS[n]} {noun} in total, so the answer is {n}.")
    return {"scene": {"size": CANVAS, "shapes": shapes}, "question": "How many shapes are in the image?",
            "answer": str(n), "expert": expert, "policy": " ".join(s["kind"] for s in left_to_right(shapes))}


def gen_digit_sum(rng: random.Random) -> dict[str, Any]:
    """Level 4: two digits drawn side by side; question: their sum (sum drawn uniformly from 0..18)."""
    total = rng.randint(0, 18)
    a = rng.randint(max(0, total - 9), min(9, total))
    b = total - a
    y = rng.randint(40, 72)
    texts = [{"text": str(a), "x": rng.randint(24, 36), "y": y, "size": 44},
             {"text": str(b), "x": rng.randint(76, 88), "y": y, "size": 44}]
    expert = (f"The image shows two digits written side by side. The digit on the left is {a} and the digit on the "
              f"right is {b}. Adding them gives {a} + {b} = {total}, so the sum of the two digits is {total}.")
    return {"scene": {"size": CANVAS, "texts": texts}, "question": "What is the sum of the two digits?",
            "answer": str(total), "expert": expert, "policy": f"{a} + {b} = {total}"}
