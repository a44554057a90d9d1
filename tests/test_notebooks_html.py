"""Static pages: calibrl.notebook.setup() makes plotly figures carry an offline HTML copy, and
`python -m calibrl notebooks-html` executes a notebook into an HTML page whose figures are present."""
import re
from pathlib import Path

import nbformat
import pytest

from calibrl import notebook, notebooks_html

NB = Path(__file__).resolve().parent.parent / "notebooks"


def test_setup_sets_an_embedding_renderer_and_validates():
    import plotly.io as pio
    old = pio.renderers.default
    try:
        assert notebook.setup() == notebook.STATIC_RENDERER == pio.renderers.default
        assert "notebook" in pio.renderers.default.split("+")      # the HTML copy, plotly.js embedded (offline)
        with pytest.raises(ValueError, match="renderer"):
            notebook.setup(renderer="no_such_renderer")
    finally:
        pio.renderers.default = old


def test_build_page_rejects_a_missing_notebook(tmp_path):
    with pytest.raises(ValueError, match="notebook: expected an existing .ipynb"):
        notebooks_html.build_page(tmp_path / "missing.ipynb", tmp_path)


@pytest.mark.slow
def test_cli_builds_a_page_with_its_figures(tmp_path):
    """CI builds notebook 01 (FAST) and finds every figure it shows in the HTML, with plotly.js embedded."""
    from calibrl.cli import main
    src = NB / "01_grpo_from_scratch.ipynb"
    shows = sum(c.source.count(".show()") for c in nbformat.read(src, as_version=4).cells if c.cell_type == "code")
    assert shows >= 1
    assert main(["notebooks-html", str(src), "--out", str(tmp_path), "--fast"]) == 0
    page = (tmp_path / "01_grpo_from_scratch.html").read_text(encoding="utf-8")
    assert notebooks_html.count_figures(page) >= shows
    assert re.search(r"plotly\.js v\d", page) and "Plotly.newPlot" in page
    assert "01_grpo_from_scratch.html" in (tmp_path / "index.html").read_text()
    assert nbformat.read(src, as_version=4).cells[1].outputs == []   # the source notebook is untouched
