"""Write the Colab install cell into every notebook (idempotent): `python tools/set_colab_cell.py [NOTEBOOK...]`.

The cell is found by its tag `colab-install` (or, the first time, by its marker comment "# Colab only"); only that
cell's source changes, every other cell is left byte-for-byte as it is. The cell installs calibrl non-editably from
the repository (the tiny model ships inside the package), keeps Colab's own torch (no torch reinstall: the package's
lower bound is met), and asks for a runtime restart only when it had to upgrade a package Colab had already imported.
The extras the cell installed before (e.g. `[trl,tb]` in notebook 10) are kept; `[gpu]` when it named none.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TAG = "colab-install"
MARKER = "# Colab only"
CELL = '''# Colab only: install calibrl from its repository (non-editable; the tiny model ships inside the package).
# REPO_URL: nothing in this project confirms this address yet; point it at the repository you cloned from.
REPO_URL = "https://github.com/calibrl/calibrl"
if "google.colab" in sys.modules:
    import importlib.metadata as md

    def _version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    before = {p: _version(p) for p in ("torch", "transformers", "plotly", "ipywidgets")}
    # Colab's torch already meets calibrl's lower bound, so pip keeps it (no multi-GB reinstall).
    %pip install -q "calibrl[@EXTRAS@] @ git+{REPO_URL}"
    from google.colab import output

    output.enable_custom_widget_manager()
    changed = [p for p, v in before.items() if v is not None and _version(p) != v]
    if changed:  # a package Colab had already imported was upgraded: only a restart loads the new version
        print(f"upgraded {changed}: Runtime -> Restart session, then run the notebook again")'''


def _source(extras: str) -> list[str]:
    lines = CELL.replace("@EXTRAS@", extras).split("\n")
    return [ln + "\n" for ln in lines[:-1]] + [lines[-1]]


def set_cell(path: Path) -> bool:
    """Rewrite the Colab cell of one notebook; returns True when the file changed."""
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    cells = [c for c in nb["cells"] if c["cell_type"] == "code" and TAG in c.get("metadata", {}).get("tags", [])]
    if not cells:
        cells = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith(MARKER)]
    if len(cells) != 1:
        raise ValueError(f"{path}: expected exactly one Colab cell (tag {TAG!r} or marker {MARKER!r}), found {len(cells)}")
    cell = cells[0]
    found = re.search(r"calibrl\[([A-Za-z0-9_,-]+)\]", "".join(cell["source"]))  # keep the notebook's extras
    cell["source"] = _source(found.group(1) if found else "gpu")
    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
    if TAG not in tags:
        tags.append(TAG)
    new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
    for p in paths:
        print(f"{p}: {'updated' if set_cell(p) else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
