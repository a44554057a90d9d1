"""Procedural visual tasks: seeded scenes drawn with PIL, questions, gold answers and two solution styles.

Public API
- `TASKS`: dict name -> TaskFamily of the built-in families, easiest first ("color", "biggest_color", "count",
  "digit_sum"); no optional dependency.
- `EXTERNAL_TASKS`: families that need an optional dependency ("rg_geometry": reasoning-gym); `make_dataset` and
  `sample` accept them too, they are kept out of `TASKS` so that code iterating over `TASKS` (the warm-start
  mixture) never needs the extra.
- `DEFAULT_TASK = "biggest_color"`: the prototype's task; a 3M-param model reaches ~50% sampled accuracy after a
  2-minute SFT, so RL groups are mixed (prototype-findings.md §2).
- `make_dataset(task, n, seed, *, style="expert") -> datasets.Dataset` with columns image, question, answer,
  solution, task, id, meta (JSON of the scene).
- `sample(task, index, seed, *, style="expert") -> dict` (one example, no `datasets` needed; image is a PIL image).
- `render(scene) -> PIL.Image.Image`.

Determinism: example `index` of (task, seed) is drawn from `random.Random(f"calibrl:{task}:{seed}:{index}")`, so it
is the same whatever `n`, and the rendered PNG bytes are identical across runs.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

from calibrl.tasks import families as _fam
from calibrl.tasks.scene import render

__all__ = ["TASKS", "EXTERNAL_TASKS", "DEFAULT_TASK", "STYLES", "INSTRUCTION", "TaskFamily", "make_dataset",
           "sample", "render", "format_solution", "get_family"]

INSTRUCTION = "Think in <think> </think>, then answer in <answer> </answer>."
STYLES = ("expert", "policy")


@dataclass(frozen=True)
class TaskFamily:
    """One task family: `generate(index, seed)` returns dict(scene, question, answer, expert, policy)."""

    name: str
    level: int
    description: str
    generate: Callable[[int, int], dict[str, Any]]
    answers: tuple[str, ...] | None = None  # the closed answer set, when there is one
    requires: str | None = None  # optional dependency (pip name)


def _seeded(name: str, gen: Callable[[random.Random], dict[str, Any]]) -> Callable[[int, int], dict[str, Any]]:
    def generate(index: int, seed: int) -> dict[str, Any]:
        return gen(random.Random(f"calibrl:{name}:{seed}:{index}"))
    return generate


def _rg_generate(index: int, seed: int) -> dict[str, Any]:
    from calibrl.tasks import rg_geometry
    return rg_geometry.generate(index, seed)


_COLORS = tuple(_fam.COLOR_NAMES)
TASKS: dict[str, TaskFamily] = {
    "color": TaskFamily("color", 1, "colour of the single shape", _seeded("color", _fam.gen_color), _COLORS),
    "biggest_color": TaskFamily("biggest_color", 2, "colour of the biggest of 3 shapes (distinct colours and sizes)",
                                _seeded("biggest_color", _fam.gen_biggest_color), _COLORS),
    "count": TaskFamily("count", 3, "number of shapes (1-4)", _seeded("count", _fam.gen_count),
                        ("1", "2", "3", "4")),
    "digit_sum": TaskFamily("digit_sum", 4, "sum of two drawn digits (0-18)", _seeded("digit_sum", _fam.gen_digit_sum),
                            tuple(str(i) for i in range(19))),
}
EXTERNAL_TASKS: dict[str, TaskFamily] = {
    "rg_geometry": TaskFamily("rg_geometry", 5, "reasoning-gym advanced_geometry (angle ABC, orthocenter), triangle "
                              "drawn from its vertices", _rg_generate, None, requires="reasoning-gym"),
}
DEFAULT_TASK = "biggest_color"


def get_family(task: str) -> TaskFamily:
    """The TaskFamily named `task` (built-in or external); ValueError listing the known names otherwise."""
    if not isinstance(task, str) or (task not in TASKS and task not in EXTERNAL_TASKS):
        known = ", ".join(list(TASKS) + list(EXTERNAL_TASKS))
        raise ValueError(f"task: unknown task {task!r}; known: {known}")
    return TASKS.get(task) or EXTERNAL_TASKS[task]


def format_solution(think: str, answer: str) -> str:
    """`<think> {think} </think><answer> {answer} </answer>`."""
    return f"<think> {think} </think><answer> {answer} </answer>"


def _check(n: int | None, seed: Any, style: str) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r} ({type(seed).__name__})")
    if style not in STYLES:
        raise ValueError(f"style: expected one of {STYLES}, got {style!r}")


def _example(fam: TaskFamily, index: int, seed: int, style: str) -> dict[str, Any]:
    raw = fam.generate(index, seed)
    return {
        "image": render(raw["scene"]),
        "question": f"{raw['question']} {INSTRUCTION}",
        "answer": raw["answer"],
        "solution": format_solution(raw[style], raw["answer"]),
        "task": fam.name,
        "id": f"{fam.name}-{seed}-{index}",
        "meta": json.dumps(raw["scene"], sort_keys=True),
    }


def sample(task: str, index: int, seed: int, *, style: str = "expert") -> dict[str, Any]:
    """Example `index` of (task, seed) as a plain dict (image = PIL RGB image), without building a Dataset."""
    fam = get_family(task)
    _check(None, seed, style)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index: expected an int >= 0, got {index!r}")
    return _example(fam, index, seed, style)


def make_dataset(task: str, n: int, seed: int, *, style: str = "expert") -> Any:
    """`n` examples of `task` from `seed` as a datasets.Dataset.

    Columns: image (Image feature, 112x112 RGB), question (includes INSTRUCTION), answer (str), solution
    (`<think> … </think><answer> … </answer>`; style="expert": long off-policy chain of thought, style="policy": the
    short style of the warm start), task, id (`task-seed-index`), meta (JSON of the scene).
    Deterministic per (task, n, seed), and example i does not depend on n. Raises ValueError on an unknown task or
    style, n < 1 or a non-int seed; an external family raises ImportError naming its missing optional dependency.
    """
    import datasets

    fam = get_family(task)
    _check(n, seed, style)
    rows = [_example(fam, i, seed, style) for i in range(n)]
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "solution": datasets.Value("string"), "task": datasets.Value("string"), "id": datasets.Value("string"),
        "meta": datasets.Value("string")})
    return datasets.Dataset.from_list(rows, features=features)
