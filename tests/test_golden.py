"""Bit-identity of the default training path: the shipped tiny model, shared-prefix sampler, fp32, CPU, grad_accum 1,
modes grpo and calibrl at the small budget (and a smoke run) must reproduce the recorded History rows and final
trainable weights exactly (float equality), so that a refactor of the rollout or trainer cannot silently change a
running study. Regenerate the fixture only on purpose: `python tests/test_golden.py --write` (then explain why)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "golden_default_path.json"
RUNS = {"small-grpo": ("small", "grpo", 3), "small-calibrl": ("small", "calibrl", 3), "smoke-calibrl": ("smoke", "calibrl", 3)}
# timing and memory columns vary run to run; everything else must be identical
VOLATILE = ("time_s",)


def _volatile(key: str) -> bool:
    return key in VOLATILE or key.endswith("_s") or key.startswith("mem_")


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_golden(key: str, out: str) -> dict:
    from calibrl.config import TrainConfig
    from calibrl.trainer import Trainer

    budget, mode, steps = RUNS[key]
    torch.set_num_threads(1)
    cfg = TrainConfig.from_budget(budget, mode=mode, seed=0, steps=steps, eval_every=0, threads=1, out=out, name=key)
    tr = Trainer(cfg)
    rows = [tr.step() for _ in range(steps)]
    rows = [{k: v for k, v in r.items() if not _volatile(k)} for r in rows]
    return {"rows": rows, "weights_sha256": weights_hash(tr.policy.model)}


@pytest.mark.slow
@pytest.mark.parametrize("key", list(RUNS))
def test_default_path_is_bit_identical_to_golden(key, tmp_path):
    golden = json.loads(FIXTURE.read_text())[key]
    got = run_golden(key, str(tmp_path))
    assert len(got["rows"]) == len(golden["rows"])
    for want, have in zip(golden["rows"], got["rows"]):
        for k, v in want.items():  # columns added later are free; recorded ones must match exactly
            assert k in have, f"{key}: column {k} disappeared"
            assert have[k] == v, f"{key} step {want['step']}: {k} = {have[k]!r}, golden {v!r}"
    assert got["weights_sha256"] == golden["weights_sha256"], f"{key}: final trainable weights differ"


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/test_golden.py --write  (regenerates the golden fixture)")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        data = {k: run_golden(k, d) for k in RUNS}
    FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
