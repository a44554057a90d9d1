"""Every repository path that README.md or a notebook cites exists in the checkout and is tracked by git (an ignore
rule once swallowed assets/runs/ while CI stayed green)."""
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ("assets", "notebooks", "benchmarks", "calibrl", "tests", "experiments", "tools", ".ci")
PATH_RE = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*)" % "|".join(re.escape(p) for p in PREFIXES))


def cited_paths(text: str) -> set[str]:
    """Repository paths in `text`: a file (its last part has an extension) or a directory written with a trailing
    slash. Globs, placeholders like <name> and slash-joined names such as TRL's `calibrl/gate_weight_mean` metrics
    are skipped."""
    out = set()
    for m in PATH_RE.finditer(text):
        raw = m.group(1).rstrip(".")
        p = raw.rstrip("/")
        end = m.end(1)
        nxt = text[end:end + 1]
        if "*" in p or "<" in p or (nxt and nxt in "*<{"):
            continue
        if raw.endswith("/") or "." in p.rsplit("/", 1)[-1]:
            out.add(p)
    return out


def sources() -> dict[str, str]:
    texts = {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        texts[str(nb.relative_to(ROOT))] = "\n".join("".join(c["source"]) for c in cells)
    return texts


def tracked() -> set[str] | None:
    try:
        res = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(res.stdout.split())


def test_the_path_pattern_finds_paths():
    found = cited_paths("see `assets/study/summary.md`, (notebooks/06_x.ipynb) and runs/x; glob assets/*.json, "
                        "calibrl/ and tests/test_a.py. `assets/study/` holds it; TRL logs calibrl/gate_weight_mean.")
    assert found == {"assets/study/summary.md", "notebooks/06_x.ipynb", "calibrl", "tests/test_a.py", "assets/study"}


@pytest.mark.parametrize("source", sorted(sources()))
def test_cited_paths_exist_and_are_tracked(source):
    files = tracked()
    missing = []
    for p in sorted(cited_paths(sources()[source])):
        exists = (ROOT / p).exists()
        in_git = files is None or p in files or any(f.startswith(p + "/") for f in files)
        if not (exists and in_git):
            missing.append(p + ("" if exists else " (missing)") + ("" if in_git else " (not tracked by git)"))
    assert not missing, f"{source} cites paths that are not in the repository: {missing}"
