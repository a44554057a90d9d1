"""calibrl.report: a crafted run directory (payloads in config.json, history.jsonl and its own name) never injects
markup; the header says what is compared and flags smoke-sized runs as a pipeline check."""
import json
from html.parser import HTMLParser

import pytest

from calibrl.report import build_report

EVIL = "<script>alert('x')</script>"
IMG = "<img src=x onerror=alert(1)>"


class _Scan(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.scripts, self._in = [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag == "script"

    def handle_endtag(self, tag):
        self._in = False

    def handle_data(self, data):
        if self._in:
            self.scripts.append(data)


def _run(tmp_path, name, mode, steps=3):
    d = tmp_path / name
    d.mkdir()
    cfg = {"model": EVIL, "task": IMG, "steps": EVIL, "prompts_per_step": IMG, "group_size": EVIL,
           "max_new_tokens": "<b>x</b>", "ppo_epochs": EVIL, "minibatches": 2, "seed": EVIL, "loss": {"mode": mode}}
    (d / "config.json").write_text(json.dumps(cfg))
    rows = [dict(step=s, mode=mode, seed=EVIL, reward_mean=0.1 * s, acc_mean=0.5, gate_passed_below=0.2)
            for s in range(1, steps + 1)]
    (d / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_crafted_run_directory_is_escaped_everywhere(tmp_path):
    dirs = [_run(tmp_path, f"calibrl-<b onmouseover=alert(2)>-s{i}", EVIL) for i in range(2)]
    dirs.append(_run(tmp_path, "grpo-s0", "grpo"))
    text = build_report(dirs, title=EVIL)
    scan = _Scan()
    scan.feed(text)
    assert not any("alert(" in s and "Plotly.newPlot" not in s for s in scan.scripts), "an injected <script> block"
    for tag, attrs in scan.tags:
        assert tag != "img", "an injected <img>"
        assert not any(k.startswith("on") for k in attrs), f"an event handler attribute on <{tag}>"
    assert "&lt;script&gt;" in text and "&lt;img src=x" in text  # shown as text
    # in the figure JSON the payload is data, and escaped again for plotly's own HTML subset in legend names
    for s in scan.scripts:
        if "Plotly.newPlot" in s:
            assert "<script" not in s.replace("<\\/script", "") and "&lt;script&gt;" in s.replace("\\u0026", "&")


def test_header_names_the_comparison_and_flags_smoke(tmp_path):
    a, b = _run(tmp_path, "calibrl-s0", "calibrl"), _run(tmp_path, "grpo-s0", "grpo")
    text = build_report([a, b])
    assert "Compares" in text and "calibrl" in text and "grpo" in text
    assert "Pipeline check, not a result" in text and "A real result" in text
    long_a = _run(tmp_path, "calibrl-s1", "calibrl", steps=12)
    assert "Pipeline check" not in build_report([long_a], budget="small")
    assert "Pipeline check" in build_report([long_a], budget="smoke")
    with pytest.raises(ValueError, match="budget"):
        build_report([a], budget="tiny")
