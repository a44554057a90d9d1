"""CalibRLTrainer across 2 processes: `accelerate launch --multi_gpu --num_processes 2` with use_cpu=True (DDP over
gloo on CPU; accelerate 1.15's `--cpu` flag would start a single process without an MPI hostfile), the real
distributed path. This file is both the test and the launched script (run as __main__ by accelerate).

Each rank records the local micro-batch tensors its probes are computed from; the test then rebuilds the global
micro-batch (rank order, widths padded with 0 as the trainer does), recomputes calibrl's probes on it and checks
that the metrics rank 0 logged equal them, that the logged loss terms are the mean of the ranks' calibrl_loss
values, that the ranks saw different rows, and that DDP kept the LoRA weights identical on both ranks."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 2


def _main(out: Path) -> None:
    """The launched script: two CalibRL steps on the tiny model; each rank saves its tensors and weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_integrations_trl import build_trainer

    from calibrl.integrations.trl import CalibRLTrainer

    torch.set_num_threads(1)
    records = []
    losses = []

    def log_probes(self, mode, *tensors):
        records.append([t.detach().cpu() for t in tensors])
        return CalibRLTrainer._log_probes(self, mode, *tensors)

    tr, _, _ = build_trainer(out / "trl", data_n=8, max_steps=STEPS, per_device_train_batch_size=4)
    tr._log_probes = log_probes.__get__(tr)
    import calibrl.integrations.trl as mod

    real = mod.calibrl_loss

    def spy(*a, **k):
        loss, info = real(*a, **k)
        losses.append(info)
        return loss, info

    mod.calibrl_loss = spy
    tr.train()
    rank = tr.accelerator.process_index
    weights = {n: p.detach().cpu() for n, p in tr.model.named_parameters() if p.requires_grad}
    state = tr.accelerator.state
    dist = {"backend": state.backend, "type": str(state.distributed_type), "world": state.num_processes,
            "device": str(state.device)}
    torch.save({"records": records, "infos": losses, "weights": weights, "dist": dist}, out / f"rank{rank}.pt")
    if tr.accelerator.is_main_process:
        (out / "log_history.json").write_text(json.dumps(tr.state.log_history))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pad(ts, value=0):
    width = max(t.shape[1] for t in ts)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in ts])


@pytest.mark.slow
def test_two_process_accelerate_run_logs_calibrl_probes_of_the_global_batch(tmp_path):
    pytest.importorskip("trl")
    from calibrl.integrations.trl import PREFIX, probe_values

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    # `--cpu` would route to accelerate's MPI launcher, which runs ONE process without --mpirun_hostfile; the
    # torch.distributed launcher plus use_cpu=True in the trainer args gives 2 CPU ranks over gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           __file__, str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    logs = [r for r in json.loads((tmp_path / "log_history.json").read_text()) if PREFIX + "loss" in r]
    assert len(logs) == STEPS
    for r in (0, 1):
        d = ranks[r]["dist"]
        assert (d["backend"], d["type"], d["world"], d["device"][:3]) == ("gloo", "DistributedType.MULTI_CPU", 2,
                                                                          "cpu"), d
    for name, w in ranks[0]["weights"].items():                                  # DDP: one model
        assert torch.equal(w, ranks[1]["weights"][name]), name
    for step, row in enumerate(logs):
        per_rank = [r["records"][step] for r in ranks]
        old, ent, mask, adv, passed, mixed, group, e_lp, e_mask, e_ent = (
            _pad([pr[i] for pr in per_rank]) if per_rank[0][i].dim() > 1 else torch.cat([pr[i] for pr in per_rank])
            for i in range(10))
        assert not set(per_rank[0][6].tolist()) & set(per_rank[1][6].tolist())    # each rank its own groups
        want = probe_values(old, ent, mask.bool(), adv, passed.bool(), mixed.bool(), group, e_lp, e_mask.bool(),
                            e_ent, 0.5)
        assert want["entropy_mean"] is not None
        for k, v in want.items():
            got = row[PREFIX + k]
            assert (v is None and got is None) or got == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)
        for k in ("pg_loss", "guide_loss", "clipfrac"):
            mean = sum(r["infos"][step][k] for r in ranks) / 2
            assert row[PREFIX + k] == pytest.approx(mean, rel=1e-5, abs=1e-6), (step, k)


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
