"""Every notebook: FAST first code cell, objectives, Summary and Exercises, Colab badge and Colab-only install,
checker cells, no outputs. (Execution itself is `pytest --nbmake notebooks/`.)"""
import re
from pathlib import Path

import nbformat
import pytest

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
EXPECTED = ["00_setup_and_smoke_test", "01_grpo_from_scratch", "02_calibrl_loss", "03_probes_on_a_real_batch",
            "04_tasks_experts_verifiers", "05_train_grpo_vs_calibrl", "06_diagnostics_dashboard", "07_exercises",
            "08_consumer_gpu_qlora"]
FAST_LINE = 'FAST = bool(os.environ.get("CI") or os.environ.get("CALIBRL_FAST"))'


def _nb(path):
    return nbformat.read(path, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _markdown(nb):
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def test_the_nine_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_sets_fast_and_prints_it(path):
    first = _code(_nb(path))[0].source
    assert FAST_LINE in first and re.search(r"print\(.*FAST", first)
    for c in _code(_nb(path))[1:]:
        assert not re.search(r"^\s*FAST\s*=", c.source, re.M), "FAST is set once, in the first code cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_structure_badge_and_colab_only_install(path):
    nb = _nb(path)
    text = _markdown(nb)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert "## Learning objectives" in nb.cells[0].source
    badge = f"https://colab.research.google.com/github/calibrl/calibrl/blob/main/notebooks/{path.name}"
    assert badge in nb.cells[0].source
    assert re.search(r"^## Summary", text, re.M) and re.search(r"^## Exercises", text, re.M)
    assert text.index("## Summary") < text.rindex("## Exercises")
    installs = [c.source for c in _code(nb) if "pip install" in c.source]
    assert installs, "an install cell for Colab"
    for src in installs:
        lines = [ln for ln in src.splitlines() if "pip install" in ln]
        assert 'if "google.colab" in sys.modules:' in src and all(ln.startswith("    ") for ln in lines)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_stripped(path):
    for cell in _code(_nb(path)):
        assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_checked_exercises_assert_against_the_library(path):
    srcs = [c.source for c in _code(_nb(path))]
    checkers = [s for s in srcs if re.search(r"Exercise \d+: correct", s)]
    assert checkers, "at least one checker cell"
    for src in checkers:
        assert "assert" in src and "is None" in src and "skipped" in src


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cells_stay_thin(path):
    for cell in _code(_nb(path)):
        assert len(cell.source.splitlines()) <= 25, f"a long cell:\n{cell.source[:200]}"
        defs = re.findall(r"^def \w+", cell.source, re.M)
        assert len(defs) <= 1
