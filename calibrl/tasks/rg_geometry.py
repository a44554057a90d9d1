"""External-check family "rg_geometry": reasoning-gym's advanced_geometry, with the triangle drawn from A, B, C.

Only the task types whose reasoning-gym score is binary-comparable are used: "angle_measure" (answer like "16.91°",
scored by rounding to 2 decimals) and "orthocenter" (answer "(x, y)", rounded to 3 decimals). "incircle_radius" is
left out: reasoning-gym gives it full credit only for the exact answer string and 0.5 for a rounded match.
Our seed s maps to reasoning-gym seed s * 1_000_003 (reasoning-gym draws item i from seed + i, so adjacent seeds
would otherwise share items). reasoning-gym is optional: `pip install reasoning-gym` (the `rg` extra).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

TASK_TYPES = ("angle_measure", "orthocenter")
SEED_STRIDE = 1_000_003
_SCALE, _CENTRE = 4.6, 56


@lru_cache(maxsize=8)
def _dataset(seed: int) -> Any:
    try:
        from reasoning_gym.geometry.advanced_geometry import AdvancedGeometryConfig, AdvancedGeometryDataset
    except ImportError as e:
        raise ImportError("task 'rg_geometry' needs the optional dependency reasoning-gym: "
                          "pip install 'calibrl[rg]' (or pip install reasoning-gym)") from e
    cfg = AdvancedGeometryConfig(task_types=list(TASK_TYPES), size=SEED_STRIDE, seed=seed * SEED_STRIDE)
    return AdvancedGeometryDataset(cfg)


def rg_entry(index: int, seed: int) -> dict[str, Any]:
    """reasoning-gym's own item (question, answer, metadata) behind example `index` of `seed`."""
    return _dataset(seed)[index]


def rg_score(answer: str | None, index: int, seed: int, entry: dict[str, Any] | None = None) -> float:
    """reasoning-gym's score_answer for a raw answer string on example `index` of `seed` (pass `entry` from
    rg_entry to skip regenerating it)."""
    return float(_dataset(seed).score_answer(answer, entry if entry is not None else rg_entry(index, seed)))


def _pt(p: Any) -> tuple[float, float]:
    return float(p[0]), float(p[1])


def _fmt(v: float) -> str:
    return f"{v:g}" if float(v).is_integer() else f"{v:.3f}"


def _angle_expert(a, b, c, answer: str) -> str:
    ba, bc = (a[0] - b[0], a[1] - b[1]), (c[0] - b[0], c[1] - b[1])
    dot = ba[0] * bc[0] + ba[1] * bc[1]
    la, lc = math.hypot(*ba), math.hypot(*bc)
    return (f"From vertex B the vector to A is ({_fmt(ba[0])}, {_fmt(ba[1])}) and the vector to C is "
            f"({_fmt(bc[0])}, {_fmt(bc[1])}). Their dot product is {_fmt(dot)} and their lengths are {la:.3f} and "
            f"{lc:.3f}, so cos(ABC) = {dot / (la * lc):.4f}. Taking the arccosine gives angle ABC = {answer}.")


def _ortho_expert(a, b, c, answer: str) -> str:
    bc, ac = (c[0] - b[0], c[1] - b[1]), (c[0] - a[0], c[1] - a[1])
    k1, k2 = bc[0] * a[0] + bc[1] * a[1], ac[0] * b[0] + ac[1] * b[1]
    return (f"The altitude from A is perpendicular to BC = ({_fmt(bc[0])}, {_fmt(bc[1])}), so it satisfies "
            f"{_fmt(bc[0])}x + {_fmt(bc[1])}y = {_fmt(k1)}. The altitude from B is perpendicular to AC = "
            f"({_fmt(ac[0])}, {_fmt(ac[1])}), so {_fmt(ac[0])}x + {_fmt(ac[1])}y = {_fmt(k2)}. Solving the two "
            f"equations gives the orthocenter {answer}.")


def generate(index: int, seed: int) -> dict[str, Any]:
    """dict(scene, question, answer, expert, policy) for example `index` of `seed` (see calibrl.tasks)."""
    e = rg_entry(index, seed)
    md = e["metadata"]
    a, b, c = _pt(md["A"]), _pt(md["B"]), _pt(md["C"])
    pts = [[round(_CENTRE + _SCALE * x, 2), round(_CENTRE - _SCALE * y, 2)] for x, y in (a, b, c)]
    scene = {"size": 112, "polygon": {"points": pts, "labels": ["A", "B", "C"]},
             "rg": {"task_type": md["task_type"], "index": index, "rg_seed": seed * SEED_STRIDE}}
    answer = e["answer"]
    if md["task_type"] == "angle_measure":
        expert, policy = _angle_expert(a, b, c, answer), f"angle ABC = {answer}"
    else:
        expert, policy = _ortho_expert(a, b, c, answer), f"H = {answer}"
    question = " ".join(e["question"].split())
    return {"scene": scene, "question": question, "answer": answer, "expert": expert, "policy": policy}
