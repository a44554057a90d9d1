"""`python -m calibrl notebooks-html --out DIR [--fast] [NOTEBOOK ...]`: execute notebooks and write static HTML
pages (nbconvert) that show every figure without Jupyter, a kernel or a network.

Each notebook runs in its own directory (relative paths such as ../assets work) in a fresh kernel; the source
.ipynb is never modified. `--fast` sets CALIBRL_FAST=1 for the kernel (the notebooks' small sizes). Figures appear
because the notebooks call calibrl.notebook.setup(), which embeds an HTML copy of each plotly figure.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Sequence

FIGURE_DIV = re.compile(r'class="plotly-graph-div"')
PLOTLY_JS = re.compile(r"plotly\.js v\d+\.\d+\.\d+")


def default_notebooks() -> list[Path]:
    """The course notebooks of a source checkout (notebooks/NN_*.ipynb next to the package), or [] in a wheel."""
    folder = Path(__file__).resolve().parent.parent / "notebooks"
    return sorted(folder.glob("[0-9][0-9]_*.ipynb"))


def count_figures(html: str) -> int:
    """Number of plotly figures rendered in an HTML page (their div elements)."""
    return len(FIGURE_DIV.findall(html))


def build_page(notebook: str | os.PathLike, out_dir: str | os.PathLike, *, fast: bool = False,
               timeout: int = 1800, extra_env: dict | None = None) -> dict:
    """Execute one notebook and write `out_dir/<stem>.html`. Returns {"notebook", "html", "figures",
    "plotly_js" (the bundle is embedded), "seconds"}. Raises ValueError for a missing file; a failing cell
    raises nbclient's CellExecutionError (with the cell and traceback)."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import ExecutePreprocessor

    path = Path(notebook)
    if not path.is_file() or path.suffix != ".ipynb":
        raise ValueError(f"notebook: expected an existing .ipynb file, got {str(path)!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise ValueError(f"timeout: expected seconds as an int > 0, got {timeout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    env = {"CALIBRL_FAST": "1"} if fast else {}
    env.update(extra_env or {})
    saved = {k: os.environ.get(k) for k in env}
    t0 = time.perf_counter()
    try:
        os.environ.update(env)  # the kernel inherits this process's environment
        ExecutePreprocessor(timeout=timeout, kernel_name="python3").preprocess(
            nb, {"metadata": {"path": str(path.resolve().parent)}})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    html, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    target = out / f"{path.stem}.html"
    target.write_text(html, encoding="utf-8")
    return {"notebook": str(path), "html": str(target), "figures": count_figures(html),
            "plotly_js": bool(PLOTLY_JS.search(html)), "seconds": round(time.perf_counter() - t0, 1)}


def build_pages(notebooks: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, fast: bool = False,
                timeout: int = 1800) -> list[dict]:
    """build_page for each notebook, in order, plus an index.html linking the pages."""
    if not notebooks:
        raise ValueError("notebooks: expected at least one notebook (none given and none found next to the package)")
    rows = [build_page(nb, out_dir, fast=fast, timeout=timeout) for nb in notebooks]
    links = "".join(f'<li><a href="{Path(r["html"]).name}">{Path(r["notebook"]).stem}</a> ({r["figures"]} figures)'
                    f"</li>" for r in rows)
    Path(out_dir, "index.html").write_text(f"<!doctype html><meta charset='utf-8'><title>calibrl notebooks</title>"
                                           f"<h1>calibrl notebooks{' (FAST)' if fast else ''}</h1><ul>{links}</ul>",
                                           encoding="utf-8")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebooks", nargs="*", help="notebooks to build (default: every notebooks/NN_*.ipynb)")
    parser.add_argument("--out", required=True, help="folder for the HTML pages (created)")
    parser.add_argument("--fast", action="store_true", help="run with CALIBRL_FAST=1 (small sizes, as CI)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")


def run(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.notebooks] or default_notebooks()
    for row in build_pages(paths, args.out, fast=args.fast, timeout=args.timeout):
        print(f"{row['html']}: {row['figures']} figures, {row['seconds']} s")
    return 0
