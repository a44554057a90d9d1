"""Every notebook: FAST first code cell, objectives, Summary and Exercises, Colab badge and Colab-only install,
checked exercises through calibrl.course (learner stubs that return None, checkers on fresh random inputs), the
static-figure setup, no outputs. (Execution itself is `pytest --nbmake notebooks/`.)"""
import re
from pathlib import Path

import nbformat
import pytest

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
EXPECTED = ["00_setup_and_smoke_test", "01_grpo_from_scratch", "02_calibrl_loss", "03_probes_on_a_real_batch",
            "04_tasks_experts_verifiers", "05_train_grpo_vs_calibrl", "06_diagnostics_dashboard", "07_exercises",
            "08_consumer_gpu_qlora", "09_diagnose_your_setup", "10_beyond_one_gpu"]
# Notebooks other workstreams are rebuilding: 08 may not yet call
# calibrl.notebook.setup(); the rules below apply to them as soon as they do.
PENDING_CHECKERS: set[str] = {"10_beyond_one_gpu"}  # no calibrl.course exercise for 10 yet
PENDING_SETUP = {"08_consumer_gpu_qlora"}
CHECK = re.compile(r'course\.check\("(\d\d)\.(\w+)", (\w+)\)')
FAST_LINE = 'FAST = bool(os.environ.get("CI") or os.environ.get("CALIBRL_FAST"))'


def _nb(path):
    return nbformat.read(path, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _markdown(nb):
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def test_the_ten_notebooks_exist():
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
def test_checked_exercises_use_course_checkers_and_start_empty(path):
    srcs = [c.source for c in _code(_nb(path))]
    checks = [(i, m) for i, src in enumerate(srcs) for m in CHECK.finditer(src)]
    if not checks and path.stem in PENDING_CHECKERS:  # rebuilt elsewhere; bound by these rules once it has checkers
        return
    assert checks, "at least one calibrl.course checker"
    from calibrl.course import EXERCISES
    for i, m in checks:
        number, _, fn = m.groups()
        assert number == path.stem[:2] and f"{number}.{m.group(2)}" in EXERCISES
        stubs = [s for s in srcs[:i] if re.search(rf"^def {fn}\(|^{fn} = None", s, re.M)]
        assert stubs, f"{fn}: the learner's cell must come before its checker"
        body = [ln.strip() for ln in stubs[-1].splitlines()[1:] if ln.strip() and not ln.strip().startswith("#")]
        assert body in (["return None"], []), f"{fn}: the learner's cell must start empty (return None), got {body}"


def test_every_exercise_is_used_by_a_notebook():
    from calibrl.course import EXERCISES
    used = {f"{m.group(1)}.{m.group(2)}" for p in NOTEBOOKS for c in _code(_nb(p)) for m in CHECK.finditer(c.source)}
    assert used == set(EXERCISES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_figures_render_without_a_kernel(path):
    """calibrl.notebook.setup() runs before the first figure, so exports and static viewers show the figures."""
    srcs = [c.source for c in _code(_nb(path))]
    first_fig = next((i for i, s in enumerate(srcs) if ".show()" in s or "fig_" in s or "Explorer(" in s), None)
    if first_fig is None or path.stem in PENDING_SETUP and not any("setup()" in s for s in srcs):
        return
    setup = next((i for i, s in enumerate(srcs) if "from calibrl.notebook import setup" in s and "setup()" in s), None)
    assert setup is not None and setup < first_fig


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cells_stay_thin(path):
    for cell in _code(_nb(path)):
        assert len(cell.source.splitlines()) <= 25, f"a long cell:\n{cell.source[:200]}"
        defs = re.findall(r"^def \w+", cell.source, re.M)
        assert len(defs) <= 1
