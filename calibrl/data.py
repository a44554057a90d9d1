"""Chat messages for prompts, saving/loading task datasets, mapping hub-shaped datasets onto our columns.

Our columns: image (datasets Image feature, RGB), question, answer (str), solution (str, optional for RL eval).
Nothing here writes to ~/.cache: datasets are built in memory (Dataset.from_list) and parquet is read with pyarrow.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["build_messages", "save_dataset", "load_dataset", "from_hub_format", "check_image", "MIN_SIDE",
           "MAX_SIDE", "MAX_ASPECT"]

MIN_SIDE, MAX_SIDE, MAX_ASPECT = 28, 4096, 200.0


def build_messages(question: str) -> list[dict[str, Any]]:
    """One user turn: an image placeholder then the question text (the processor's chat template fills the image)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question: expected a non-empty str, got {question!r}")
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def check_image(image: Any, row: int | str = "?", *, min_side: int | None = MIN_SIDE,
                max_side: int | None = MAX_SIDE, label: str | None = None) -> Any:
    """Return `image` as a PIL RGB image; ValueError naming the row (or `label`) for a non-image, an empty image,
    an aspect ratio > 200 (checked before the sides), or a side < min_side or > max_side px (Qwen2.5-VL's
    processor limits by default; None disables a bound). Accepts PIL images and datasets-style dicts
    {"bytes": ..., "path": ...}. Any PIL mode is converted: alpha composited on white, 16-bit and float rescaled."""
    import io

    from PIL import Image

    label = label or f"image (row {row})"
    if isinstance(image, dict) and (image.get("bytes") or image.get("path")):
        image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
    if not isinstance(image, Image.Image):
        raise ValueError(f"{label}: expected a PIL image, got {type(image).__name__}")
    w, h = image.size
    if w < 1 or h < 1:
        raise ValueError(f"{label}: expected a non-empty image, got size {w}x{h}")
    if max(w, h) / min(w, h) > MAX_ASPECT:  # checked first: extreme strips report their aspect
        raise ValueError(f"{label}: expected aspect ratio <= {MAX_ASPECT:g}, got {w}x{h}")
    if (min_side is not None and min(w, h) < min_side) or (max_side is not None and max(w, h) > max_side):
        raise ValueError(f"{label}: expected sides in [{min_side or 1}, {max_side or 'inf'}] px, got {w}x{h}")
    return _to_rgb(image, label)


def _to_rgb(image: Any, label: str) -> Any:
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        import numpy as np

        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"{label}: cannot convert mode {image.mode!r} to RGB: {e}") from e


def _features(with_solution: bool, extra: dict[str, Any] | None = None) -> Any:
    import datasets

    f = {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    if with_solution:
        f["solution"] = datasets.Value("string")
    f.update(extra or {})
    return datasets.Features(f)


def save_dataset(ds: Any, path: str | os.PathLike, *, format: str = "disk") -> Path:
    """Save a Dataset: format="disk" -> `save_to_disk(path)` (a folder), format="parquet" -> one parquet file.
    Returns the path written."""
    import datasets

    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"ds: expected a datasets.Dataset, got {type(ds).__name__}")
    if format not in ("disk", "parquet"):
        raise ValueError(f"format: expected 'disk' or 'parquet', got {format!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "disk":
        ds.save_to_disk(str(path))
    else:
        ds.to_parquet(str(path))
    return path


def load_dataset(path: str | os.PathLike) -> Any:
    """Load what save_dataset wrote: a save_to_disk folder, or a .parquet file (read in memory with pyarrow, so
    the Image feature stored in the parquet metadata is kept and nothing is cached)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise ValueError(f"path: {str(path)!r} does not exist")
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    if path.suffix != ".parquet":
        raise ValueError(f"path: expected a save_to_disk folder or a .parquet file, got {str(path)!r}")
    import pyarrow.parquet as pq

    return datasets.Dataset(pq.read_table(str(path)))


def _first(value: Any, column: str, row: int) -> Any:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{column} (row {row}): expected a non-empty list")
        return value[0]
    return value


def _solution(value: Any, row: int) -> str | None:
    value = _first(value, "solution", row)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"solution (row {row}): expected str, list or dict with 'content', got {type(value).__name__}")
    return value


def from_hub_format(ds: Any, *, require_solution: bool = False, add_instruction: bool = True) -> Any:
    """Map a hub-shaped dataset onto our columns (image, question, answer[, solution]).

    Accepted shapes: `image` or `images` (a list: its first element is taken), `question` or `problem`, `answer`
    (numbers become str), optional `solution` (str; list -> its first element; dict -> its "content"). A leading
    "<image>" placeholder in the question is removed, and with `add_instruction` the think/answer instruction is
    appended when the question does not mention <answer>. Images are validated with check_image (RGB, sides,
    aspect). A missing column raises ValueError naming it; the solution column is required only when
    `require_solution` (then a row without one is an error too).
    """
    import datasets

    from calibrl.tasks import INSTRUCTION

    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"ds: expected a datasets.Dataset, got {type(ds).__name__}")
    cols = set(ds.column_names)
    img_col = "image" if "image" in cols else "images" if "images" in cols else None
    q_col = "question" if "question" in cols else "problem" if "problem" in cols else None
    missing = [name for name, c in (("image (or images)", img_col), ("question (or problem)", q_col),
                                    ("answer", "answer" if "answer" in cols else None)) if c is None]
    if require_solution and "solution" not in cols:
        missing.append("solution")
    if missing:
        raise ValueError(f"ds: missing column(s) {', '.join(missing)}; has {sorted(cols)}")
    has_sol = "solution" in cols
    rows = []
    for i, ex in enumerate(ds):
        q = ex[q_col]
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{q_col} (row {i}): expected a non-empty str, got {q!r}")
        q = q.strip()
        if q.lower().startswith("<image>"):
            q = q[len("<image>"):].strip()
        if add_instruction and "<answer>" not in q:
            q = f"{q} {INSTRUCTION}"
        ans = ex["answer"]
        if ans is None or (isinstance(ans, str) and not ans.strip()):
            raise ValueError(f"answer (row {i}): expected a non-empty answer, got {ans!r}")
        row = {"image": check_image(_first(ex[img_col], img_col, i), i), "question": q, "answer": str(ans).strip()}
        if has_sol:
            sol = _solution(ex["solution"], i)
            if sol is None and require_solution:
                raise ValueError(f"solution (row {i}): required but missing")
            row["solution"] = sol or ""
        rows.append(row)
    return datasets.Dataset.from_list(rows, features=_features(has_sol))


def load_user_dataset(path: str | os.PathLike, *, require_solution: bool = False) -> Any:
    """A dataset given on the command line (`--data DIR`): a save_dataset folder or .parquet file, in our columns or
    in a hub format, mapped and validated with `from_hub_format` (so both shapes give image, question, answer[,
    solution])."""
    return from_hub_format(load_dataset(path), require_solution=require_solution)
