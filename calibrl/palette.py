"""The one palette: a colour per method (every figure, widget and the report), plus the passed/failed colours.

No imports from the rest of calibrl, so every figure module can import it without circles.
"""
from __future__ import annotations

import re

METHOD_COLORS: dict[str, str] = {
    "grpo": "#636EFA", "calibrl": "#EF553B", "dr_grpo": "#00CC96", "dapo": "#AB63FA",
    "luffy": "#FFA15A", "rlplus": "#19D3F3", "expert": "#7F7F7F",
}
"""One colour per method, used by every figure and widget."""
OTHER_COLOR = "#BAB0AC"
"""Colour of a run or label that names no known method (e.g. the start policy)."""
PASSED_COLOR, FAILED_COLOR = "#2E7D32", "#8C564B"
"""Colours of passed (s=+1) and failed (s=-1) rows; not methods."""
PASSED_LIGHT, FAILED_LIGHT = "#A5D6A7", "#D7B9A8"
"""Lighter shades for the weight-alpha side of the gate."""
REFERENCE_COLOR = "#999999"
"""Reference lines (gate boundary, chance level, the current value of a control)."""


def method_color(name: str) -> str:
    """Colour of a method, or of a label that contains a method name as a word (e.g. "calibrl α=0.3" or
    "grpo after"); OTHER_COLOR when no method is named. Longer names win (dr_grpo before grpo)."""
    if not isinstance(name, str):
        raise ValueError(f"name: expected a method name or label string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    for method in sorted(METHOD_COLORS, key=len, reverse=True):
        if re.search(rf"(?<![a-z_]){re.escape(method)}(?![a-z_])", key):
            return METHOD_COLORS[method]
    return OTHER_COLOR
