"""Rewrite the study tables in README.md (between the study-tables markers) from the shipped run files, exactly as
`python -m calibrl sweep assets/study/spec.json --out assets/study --summarize-only` writes assets/study/summary.md.

    python tools/update_readme_study.py
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- study-tables -->", "<!-- /study-tables -->"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    from calibrl import sweep, sweep_summary

    spec = sweep.load_spec(ROOT / "assets" / "study" / "spec.json")
    summary = sweep_summary.write_summary(spec, ROOT / "assets" / "study")
    body = sweep_summary.to_markdown(summary).split("\n", 2)[2].replace("\n## ", "\n#### ")  # drop the title
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md: expected the markers {START} and {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    (ROOT / "README.md").write_text(f"{head}{START}\n{body.strip()}\n{END}{tail}", encoding="utf-8")
    print(f"README.md: study tables from {summary['n_runs']} finished runs")
    import plot_study  # the README figure, from the same runs

    plot_study.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
