"""Notebook setup shared by every notebook: how figures are displayed.

`setup()` makes each plotly figure carry two outputs: the interactive plotly mimetype (JupyterLab, VS Code) and an
HTML copy that needs no kernel and no network (plotly.js is embedded once per notebook, in the first figure's
output). So a notebook executed and exported with nbconvert (`python -m calibrl notebooks-html`), or opened in any
viewer that renders HTML outputs, shows its figures. On Colab the "colab" renderer (HTML) is kept.
"""
from __future__ import annotations

import os
import sys

STATIC_RENDERER = "plotly_mimetype+notebook"
"""The default: interactive mimetype plus an offline HTML copy (plotly's `notebook` renderer, connected=False)."""


def fast_mode() -> bool:
    """True when CI or CALIBRL_FAST is set (the notebooks' FAST switch)."""
    return bool(os.environ.get("CI") or os.environ.get("CALIBRL_FAST"))


def setup(*, renderer: str | None = None) -> str:
    """Set plotly's default renderer for this notebook and return its name.

    renderer: None picks "colab" on Colab and STATIC_RENDERER elsewhere; any name plotly knows is accepted (e.g.
    "plotly_mimetype" alone to keep outputs small).
    """
    import plotly.io as pio

    if renderer is None:
        renderer = "colab" if "google.colab" in sys.modules else STATIC_RENDERER
    if not isinstance(renderer, str) or not all(p in pio.renderers for p in renderer.split("+")):
        raise ValueError(f"renderer: expected a plotly renderer name (or names joined by '+'), got {renderer!r}; "
                         f"known: {sorted(pio.renderers)}")
    pio.renderers.default = renderer
    return renderer
