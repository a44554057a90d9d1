"""Adversarial cases for every public tensor function (advantage, losses, losses_hybrid, probes).

For a valid input set drawn from a seed, `cases(spec, seed)` yields one corrupted copy per bad-input class and
argument, with the expected outcome: "error" (a ValueError whose message starts with "<argument>:") or "equal"
(a benign variation: finite result equal to the reference of tests/fuzz_refs.py, gradients included, and no
gradient reaching inputs that are constants). `outcome(case)` runs one case and classifies it:
ok-error, ok-equal, silent (accepted bad input, or a wrong / non-finite number), unclear (another exception type,
or a ValueError naming another argument), rejected (a benign input refused).
Used by tests/test_fuzz_tensor_api.py (hypothesis) and benchmarks/fuzz_tensor_api.py (the counted campaign).
"""
import math
from dataclasses import dataclass, field

import torch

import fuzz_refs as R

CLASSES = ("shape", "dtype", "mask", "non-finite", "range", "mixed-dtype", "mixed-device", "half", "requires-grad")


@dataclass
class Arg:
    name: str
    kind: str                       # float | logp | ent | mask | rowmask | int | gid
    where: object = None            # f(d) -> bool tensor of the positions that matter (None: all)
    tied: tuple = ()                # dims whose size must match another argument
    allow_empty: bool = True        # masks: all-False accepted
    const: bool = False             # a constant of the equation: no gradient may reach it
    ref: bool = False               # the reference argument others are compared against
    label: str = None               # the argument's name in the function's signature (default: name)

    def __post_init__(self):
        self.label = self.label or self.name


@dataclass
class Spec:
    name: str
    fn: object
    make: object                    # f(generator) -> dict of inputs
    call: object                    # f(fn, d) -> result
    args: list
    scalars: dict = field(default_factory=dict)   # name -> bad values
    var: str = None                 # differentiable argument (gradient compared with the reference's)
    out: str = "loss"               # loss | dict | tensor | float | bool
    rtol: float = 1e-4


# ------------------------------------------------------------------------------------------------ valid inputs
def _mask(g, B, T, p=0.7):
    m = torch.rand(B, T, generator=g) < p
    m[torch.randint(0, B, (1,), generator=g), 0] = True
    return m


def _logp(g, shape, m=None):
    x = -torch.rand(*shape, generator=g) * 3 - 0.01
    return x if m is None else torch.where(m, x, torch.tensor(float("-inf")))   # pads hold -inf


def _dims(g):
    return int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))


def make_policy(g):
    B, T = _dims(g)
    m = _mask(g, B, T)
    old = _logp(g, (B, T), m)
    lp = torch.where(m, (old + torch.randn(B, T, generator=g) * 0.3).clamp(max=0.0), old)
    return dict(logp=lp, old_logp=old, adv=torch.randn(B, generator=g), mask=m,
                ref_logp=_logp(g, (B, T)), entropy=torch.rand(B, T, generator=g) * 2,
                expert_logp=_logp(g, (B, int(torch.randint(1, 8, (1,), generator=g)))),
                passed=torch.rand(B, generator=g) > 0.5)


def make_hybrid(g):
    d = make_policy(g)
    E, te = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    em = torch.rand(E, te, generator=g) < 0.7
    d.update(e_lp=_logp(g, (E, te)), e_old=_logp(g, (E, te)), e_adv=torch.randn(E, generator=g), e_mask=em)
    return d


def make_groups(g):
    n_groups, size = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
    gid = torch.arange(n_groups).repeat_interleave(size)
    r = (torch.rand(len(gid), generator=g) > 0.5).float() + 0.1 * (torch.rand(len(gid), generator=g) > 0.5).float()
    return dict(rewards=r, group_ids=gid, passed=r > 0.1, on_policy=torch.ones(len(gid), dtype=torch.bool))


def make_entropy(g):
    B, T = _dims(g)
    V = int(torch.randint(2, 7, (1,), generator=g))
    z = torch.randn(B, T, V, generator=g) * 3
    z[..., 0] = float("-inf")                                                   # a suppressed id
    return dict(logits=z, hidden=torch.randn(B, T, 4, generator=g), lm_head_weight=torch.randn(V, 4, generator=g),
                bias=torch.randn(V, generator=g), mask=_mask(g, B, T))


def make_summary(g):
    d = make_policy(g)
    E, te = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    d.update(expert_entropy=torch.rand(E, te, generator=g), expert_mask=_mask(g, E, te))
    return d


def make_gate(g):
    d = make_policy(g)
    B, T = d["logp"].shape
    te = d["expert_logp"].shape[1]
    d["expert_mask"] = torch.rand(B, te, generator=g) < 0.8
    d["rows"] = torch.rand(B, generator=g) < 0.8
    d["expert_len"] = torch.randint(0, te + 1, (B,), generator=g)
    d["tok_weight"] = torch.rand(B, T, generator=g)
    d["gap"] = torch.where(d["mask"], d["logp"], 0.0) - R.expert_baseline(d["expert_logp"], T).float()
    d["gap"][0, 0] = 0.0                                                        # a tie
    d["passed2"] = d["passed"][:, None]
    return d


# ------------------------------------------------------------------------------------------------ specs
def _m(d):
    return d["mask"].bool()


def _em(d):
    return d["e_mask"].bool()


def _pol_kw(d, *names):
    return {k: d[k] for k in names if k in d}


def specs():
    from calibrl import advantage as A, losses as L, probes as P

    pol_args = [Arg("logp", "logp", _m, ref=True), Arg("old_logp", "logp", _m, (0, 1), const=True),
                Arg("adv", "float", None, (0,), const=True), Arg("mask", "mask", None, (0, 1), allow_empty=False)]
    clip_bad = {"clip_low": [-0.1, 1.0, float("nan"), True], "clip_high": [-0.5, float("inf")],
                "clip_c": [1.0, 0.5], "agg": ["mean"], "norm_len": [0, -3, 2.5, True]}
    e_args = [Arg("e_lp", "logp", _em, label="expert_logp_theta"),
              Arg("e_adv", "float", None, (0,), const=True, label="expert_adv"),
              Arg("e_mask", "mask", None, (0, 1), label="expert_mask")]
    out = [
        Spec("aggregate", L.aggregate, make_policy,
             lambda f, d: f(d["entropy"], d["mask"], d.get("mode", "seq-mean-token-mean"), norm_len=d.get("norm_len")),
             [Arg("entropy", "float", _m, ref=True, label="loss_mat"),
              Arg("mask", "mask", None, (0, 1), allow_empty=False)],
             {"mode": ["sum", None], "norm_len": [0, True, 1.5]}, var="entropy", out="tensor"),
        Spec("policy_loss", L.policy_loss, make_policy,
             lambda f, d: f(d["logp"], d["old_logp"], d["adv"], d["mask"], kl_coef=d.get("kl_coef", 0.1),
                            ref_logp=d["ref_logp"], entropy=d["entropy"], entropy_coef=d.get("entropy_coef", 0.01),
                            **_pol_kw(d, *clip_bad)),
             pol_args + [Arg("ref_logp", "logp", _m, (0, 1), const=True), Arg("entropy", "ent", _m, (0, 1))],
             dict(clip_bad, kl_coef=[-1.0, float("nan")], entropy_coef=[-0.1]), var="logp"),
        Spec("calibrl_loss", L.calibrl_loss, make_gate,
             lambda f, d: f(d["logp"], d["old_logp"], d["expert_logp"], d["adv"], d["mask"], d["passed"],
                            expert_mask=d["expert_mask"], gap=d.get("gap_mode", "token"),
                            **_pol_kw(d, "slope", "guide_coef", "weight", *clip_bad)),
             pol_args + [Arg("expert_logp", "logp", lambda d: d["expert_mask"].bool(), (0,), const=True),
                         Arg("expert_mask", "mask", None, (0, 1)), Arg("passed", "rowmask", None, (0,))],
             dict(clip_bad, slope=[1.5, -0.1, float("nan")], guide_coef=[-1.0, float("inf")], weight=["abs"],
                  gap_mode=["seq"]), var="logp"),
        Spec("calibrl_loss[sequence]", L.calibrl_loss, make_gate,
             lambda f, d: f(d["logp"], d["old_logp"], d["expert_logp"], d["adv"], d["mask"], d["passed"],
                            expert_mask=d["expert_mask"], gap="sequence", slope=d.get("slope", 0.3)),
             pol_args + [Arg("expert_logp", "logp", lambda d: d["expert_mask"].bool(), (0,), const=True),
                         Arg("expert_mask", "mask", None, (0, 1)), Arg("passed", "rowmask", None, (0,))],
             {"slope": [2.0]}, var="logp"),
        Spec("luffy_loss", L.luffy_loss, make_hybrid,
             lambda f, d: f(d["logp"], d["old_logp"], d["adv"], d["mask"], d["e_lp"], d["e_adv"], d["e_mask"],
                            **_pol_kw(d, "gamma", *clip_bad)),
             pol_args + e_args, dict(clip_bad, gamma=[0.0, -1.0]), var="logp"),
        Spec("rlplus_loss", L.rlplus_loss, make_hybrid,
             lambda f, d: f(d["logp"], d["old_logp"], d["adv"], d["mask"], d["e_lp"], d["e_old"], d["e_adv"],
                            d["e_mask"], **_pol_kw(d, "gamma", *clip_bad)),
             pol_args + e_args + [Arg("e_old", "logp", _em, (0, 1), const=True, label="expert_old_logp")],
             dict(clip_bad, gamma=[-0.5, float("nan")]), var="logp"),
        Spec("gate_full_side", L.gate_full_side, make_gate, lambda f, d: f(d["gap"], d["passed2"]),
             [Arg("gap", "float", None, ref=True), Arg("passed2", "rowmask", None, (0,), label="passed")], out="bool"),
        Spec("gate_fractions", L.gate_fractions, make_gate,
             lambda f, d: f(d["gap"], d["mask"], d["passed2"], d.get("slope", 0.5)),
             [Arg("gap", "float", _m, ref=True), Arg("mask", "mask", None, (0, 1)),
              Arg("passed2", "rowmask", None, (0,), label="passed")], {"slope": [-1.0, 1.01]}, out="dict"),
        Spec("expert_baseline", L.expert_baseline, make_gate,
             lambda f, d: f(d["expert_logp"], d.get("T", 4), d["expert_mask"]),
             [Arg("expert_logp", "logp", lambda d: d["expert_mask"].bool(), ref=True),
              Arg("expert_mask", "mask", None, (0, 1))], {"T": [-1, 2.0, True]}, out="tensor"),
        Spec("group_advantages", A.group_advantages, make_groups,
             lambda f, d: f(d["rewards"], d["group_ids"], scale=d.get("scale", "group"), eps=d.get("eps", 1e-6),
                            on_policy=d["on_policy"]),
             [Arg("rewards", "real", None, ref=True), Arg("group_ids", "gid", None, (0,)),
              Arg("on_policy", "mask", None, (0,), allow_empty=False)],
             {"eps": [0.0, -1e-6, float("nan"), True], "scale": ["std"]}, out="tensor"),
        Spec("pass_mask", A.pass_mask, make_groups, lambda f, d: f(d["rewards"], threshold=d.get("threshold", 0.1)),
             [Arg("rewards", "real", None, ref=True)], {"threshold": [float("nan"), "0.1", True]}, out="bool"),
        Spec("group_stats", A.group_stats, make_groups,
             lambda f, d: f(d["rewards"], d["group_ids"], d["passed"], scale=d.get("scale", "none"),
                            eps=d.get("eps", 1e-6)),
             [Arg("rewards", "real", None, ref=True), Arg("group_ids", "gid", None, (0,)),
              Arg("passed", "rowmask", None, (0,))], {"eps": [0.0], "scale": ["x"]}, out="dict"),
        Spec("token_entropy", P.token_entropy, make_entropy,
             lambda f, d: f(d["logits"], chunk_size=d.get("chunk_size", 3), temperature=d.get("temperature", 0.7)),
             [Arg("logits", "float", None, ref=True)],
             {"chunk_size": [0, 1.5, True], "temperature": [0.0, -1.0, float("inf")]}, out="tensor"),
        Spec("entropy_from_hidden", P.entropy_from_hidden, make_entropy,
             lambda f, d: f(d["hidden"], d["lm_head_weight"], bias=d["bias"], mask=d["mask"],
                            chunk_size=d.get("chunk_size", 2), temperature=d.get("temperature", 1.0),
                            suppress_ids=d.get("suppress_ids", [1])),
             [Arg("hidden", "float", _m, ref=True), Arg("lm_head_weight", "float", None, (1,)),
              Arg("bias", "float", None, (0,)), Arg("mask", "mask", None, (0, 1))],
             {"chunk_size": [0], "temperature": [0.0], "suppress_ids": [[99], [-1], [0.5]]}, out="tensor", rtol=1e-3),
        Spec("entropy_summary", P.entropy_summary, make_summary,
             lambda f, d: f(d["entropy"], d["mask"], d["passed"], d["expert_entropy"], d["expert_mask"]),
             [Arg("entropy", "ent", _m, ref=True), Arg("mask", "mask", None, (0, 1), allow_empty=False),
              Arg("passed", "rowmask", None, (0,)),
              Arg("expert_entropy", "ent", lambda d: d["expert_mask"].bool()),
              Arg("expert_mask", "mask", None, (0, 1))], out="dict"),
        Spec("group_rarity", P.group_rarity, make_groups,
             lambda f, d: f(d["rewards"], d["group_ids"], d["passed"], bins=d.get("bins", 4),
                            scale=d.get("scale", "group")),
             [Arg("rewards", "real", None, ref=True), Arg("group_ids", "gid", None, (0,)),
              Arg("passed", "rowmask", None, (0,))], {"bins": [0, 2.0, True], "scale": ["z"]}, out="dict"),
        Spec("gate_activation", P.gate_activation, make_gate,
             lambda f, d: f(d["logp"], d["expert_logp"], d["mask"], d["passed"], d.get("slope", 0.5), rows=d["rows"],
                            adv=d["adv"], expert_mask=d["expert_mask"]),
             [Arg("logp", "logp", _m, ref=True), Arg("expert_logp", "logp", lambda d: d["expert_mask"].bool(), (0,)),
              Arg("mask", "mask", None, (0, 1)), Arg("passed", "rowmask", None, (0,)),
              Arg("rows", "rowmask", None, (0,)), Arg("adv", "float", None, (0,)),
              Arg("expert_mask", "mask", None, (0, 1))], {"slope": [1.5, float("nan")]}, out="dict"),
        Spec("expert_gap", P.expert_gap, make_gate,
             lambda f, d: f(d["logp"], d["expert_logp"], d["mask"], d["expert_len"]),
             [Arg("logp", "logp", _m, ref=True),
              Arg("expert_logp", "logp", lambda d: torch.arange(d["expert_logp"].shape[1])[None, :]
                  < d["expert_len"][:, None], (0,)),
              Arg("mask", "mask", None, (0, 1), allow_empty=False), Arg("expert_len", "int", None, (0,))],
             out="dict"),
        Spec("cov_logp_adv", P.cov_logp_adv, make_gate, lambda f, d: f(d["logp"], d["adv"], d["mask"], d["tok_weight"]),
             [Arg("logp", "logp", _m, ref=True), Arg("adv", "float", None, (0,)),
              Arg("mask", "mask", None, (0, 1), allow_empty=False),
              Arg("tok_weight", "float", _m, (0, 1), label="weight")], out="float"),
        Spec("gradient_split", P.gradient_split, _split_make,
             lambda f, d: _split_call(lambda a, b, p: f(a, b, p, accumulate=d.get("acc", False)), d), [], out="dict"),
    ]
    return out


REFS = {"aggregate": lambda d: R.aggregate(d["entropy"], d["mask"], d.get("mode", "seq-mean-token-mean"),
                                           d.get("norm_len")),
        "policy_loss": lambda d: R.policy(d["logp"], d["old_logp"], d["adv"], d["mask"], ref_logp=d["ref_logp"],
                                          kl_coef=0.1, entropy=d["entropy"], entropy_coef=0.01),
        "calibrl_loss": lambda d: R.calibrl(d["logp"], d["old_logp"], d["expert_logp"], d["adv"], d["mask"],
                                            d["passed"], expert_mask=d["expert_mask"]),
        "calibrl_loss[sequence]": lambda d: R.calibrl(d["logp"], d["old_logp"], d["expert_logp"], d["adv"],
                                                      d["mask"], d["passed"], expert_mask=d["expert_mask"],
                                                      gap="sequence", slope=0.3),
        "luffy_loss": lambda d: R.luffy(d["logp"], d["old_logp"], d["adv"], d["mask"], d["e_lp"], d["e_adv"],
                                        d["e_mask"]),
        "rlplus_loss": lambda d: R.rlplus(d["logp"], d["old_logp"], d["adv"], d["mask"], d["e_lp"], d["e_old"],
                                          d["e_adv"], d["e_mask"]),
        "gate_full_side": lambda d: R.gate_full_side(d["gap"], d["passed2"]),
        "gate_fractions": lambda d: R.gate_fractions(d["gap"], d["mask"], d["passed2"], 0.5),
        "expert_baseline": lambda d: R.expert_baseline(d["expert_logp"], 4, d["expert_mask"]),
        "group_advantages": lambda d: R.group_advantages(d["rewards"], d["group_ids"], "group", 1e-6,
                                                         d["on_policy"]),
        "pass_mask": lambda d: R.pass_mask(d["rewards"]),
        "group_stats": lambda d: R.group_stats(d["rewards"], d["group_ids"], d["passed"]),
        "token_entropy": lambda d: R.token_entropy(d["logits"], temperature=0.7),
        "entropy_from_hidden": lambda d: R.entropy_from_hidden(d["hidden"], d["lm_head_weight"], d["bias"],
                                                               d["mask"], suppress_ids=[1]),
        "entropy_summary": lambda d: R.entropy_summary(d["entropy"], d["mask"], d["passed"], d["expert_entropy"],
                                                       d["expert_mask"]),
        "group_rarity": lambda d: R.group_rarity(d["rewards"], d["group_ids"], d["passed"], 4, "group"),
        "gate_activation": lambda d: R.gate_activation(d["logp"], d["expert_logp"], d["mask"], d["passed"], 0.5,
                                                       d["rows"], d["adv"], d["expert_mask"]),
        "expert_gap": lambda d: R.expert_gap(d["logp"], d["expert_logp"], d["mask"], d["expert_len"]),
        "cov_logp_adv": lambda d: R.cov_logp_adv(d["logp"], d["adv"], d["mask"], d["tok_weight"]),
        }


SCALAR_LABELS = {"gap_mode": "gap"}
HALF = (torch.bfloat16, torch.float16)


@dataclass
class Case:
    spec: Spec
    cls: str
    what: str
    d: dict
    expect: str                      # "error" | "equal"
    arg: str = None                  # argument the ValueError must name
    const: tuple = ()                # constants that must get no gradient


def _set(x, idx, v):
    x = x.clone()
    x[idx] = v
    return x


def _first(where):
    """Index of the first True of a bool tensor, or None."""
    nz = where.nonzero()
    return tuple(nz[0].tolist()) if len(nz) else None


def _split_call(f, d):
    """gradient_split on pg = sum(c1 w) + sum(w^2)/2 and guide = scale * sum(c2 w) (fresh graph per call)."""
    w = d["w"]
    pg = (d["c1"] * w).sum() + 0.5 * (w * w).sum() if d.get("pg") is None else d["pg"](w)
    guide = d["scale"] * (d["c2"] * w).sum() if d.get("guide") is None else d["guide"](w)
    return f(pg, guide, d.get("params", [w]))


def _split_ref(d):
    w, c1, c2 = d["w"].detach().double(), d["c1"].double(), d["c2"].double()
    ga, gb = c1 + w, float(d["scale"]) * c2
    na, nb = float(ga.norm()), float(gb.norm())
    fin = lambda v: v if math.isfinite(v) else None
    na, nb = fin(na), fin(nb)
    cos = max(-1.0, min(1.0, float(ga @ gb) / (na * nb))) if na and nb else None
    return {"grad_norm_pg": na, "grad_norm_guide": nb, "grad_cos_pg_guide": cos}


def _split_make(g):
    n = int(torch.randint(1, 6, (1,), generator=g))
    return dict(w=torch.randn(n, generator=g).requires_grad_(True), c1=torch.randn(n, generator=g),
                c2=torch.randn(n, generator=g), scale=0.1)


REFS["gradient_split"] = _split_ref


def split_cases(spec, seed):
    g = torch.Generator().manual_seed(seed)
    d0 = spec.make(g)
    new = lambda **kw: {**d0, **kw}
    w = d0["w"]
    nan = float("nan")
    return [
        Case(spec, "valid", "as drawn", d0, "equal"),
        Case(spec, "shape", "pg_loss not a scalar", new(pg=lambda w: torch.stack([w.sum(), w.sum()])), "error",
             "pg_loss"),
        Case(spec, "shape", "guide_loss not a scalar", new(guide=lambda w: torch.stack([w.sum(), w.sum()])),
             "error", "guide_loss"),
        Case(spec, "dtype", "params holds a list", new(params=[[1.0]]), "error", "params"),
        Case(spec, "shape", "params empty", new(params=[]), "error", "params"),
        Case(spec, "non-finite", "pg_loss NaN", new(pg=lambda w: (w * nan).sum()), "error", "pg_loss"),
        Case(spec, "non-finite", "guide_loss inf", new(guide=lambda w: w.sum() * float("inf")), "error", "guide_loss"),
        Case(spec, "range", "gradients near float32 max (squares overflow in float32)", new(scale=1e30), "equal"),
        Case(spec, "range", "infinite guide gradient from a finite loss", new(scale=float("inf"), guide=lambda w: (
            torch.sqrt(w * w * 0.0)).sum()), "equal"),
        Case(spec, "requires-grad", "params do not require grad", new(params=[w.detach()]), "error", "params"),
        Case(spec, "requires-grad", "pg_loss without grad", new(pg=lambda w: w.detach().sum()), "error", "pg_loss"),
        Case(spec, "mixed-dtype", "a float64 parameter next to float32", new(
            params=[w, torch.zeros(2, dtype=torch.float64, requires_grad=True)]), "equal"),
        Case(spec, "range", "accumulate=1", new(acc=1), "error", "accumulate"),
    ]


def cases(spec: Spec, seed: int):
    """Every corrupted variant of one valid input set (see the module docstring)."""
    if spec.name == "gradient_split":
        return split_cases(spec, seed)
    g = torch.Generator().manual_seed(seed)
    d0 = spec.make(g)
    tensors = [a for a in spec.args if torch.is_tensor(d0[a.name])]
    floats = [a for a in tensors if a.kind in ("float", "logp", "ent", "real")]
    new = lambda **kw: {**d0, **kw}
    out = [Case(spec, "valid", "as drawn", d0, "equal")]
    for a in tensors:
        x, lab = d0[a.name], a.label
        # shape
        if spec.name == "token_entropy":
            out.append(Case(spec, "shape", f"{lab} V=0", new(**{a.name: x[..., :0]}), "error", lab))
        else:
            out.append(Case(spec, "shape", f"{lab} ndim+2", new(**{a.name: x[None, None]}), "error", lab))
        for k in a.tied:
            if spec.name == "gate_fractions" and a.name == "mask" and k == 1 and d0["gap"].shape[1] == 1:
                continue                                                        # a [B,1] row gap fits any T
            if x.dim() > k and x.shape[k] > 0:
                y = torch.cat([x, x.narrow(k, 0, 1)], k)
                out.append(Case(spec, "shape", f"{lab} dim {k} + 1", new(**{a.name: y}), "error", lab))
        # dtype
        if a.kind in ("float", "logp", "ent"):
            out.append(Case(spec, "dtype", f"{lab} int64", new(**{a.name: x.nan_to_num(0, 0, 0).long()}), "error", lab))
        elif a.kind == "real":                                                  # rewards: float or int
            out.append(Case(spec, "dtype", f"{lab} bool", new(**{a.name: x > 0}), "error", lab))
            out.append(Case(spec, "dtype", f"{lab} complex", new(**{a.name: x.to(torch.complex64)}), "error", lab))
            out.append(Case(spec, "dtype", f"{lab} int64 (allowed)", new(**{a.name: x.round().long()}), "equal"))
        elif a.kind in ("mask", "rowmask"):
            out.append(Case(spec, "dtype", f"{lab} complex", new(**{a.name: x.to(torch.complex64)}), "error", lab))
            out.append(Case(spec, "dtype", f"{lab} float 0/1", new(**{a.name: x.float()}), "equal"))
        else:
            out.append(Case(spec, "dtype", f"{lab} float", new(**{a.name: x.float()}), "error", lab))
        # mask values
        if a.kind in ("mask", "rowmask") and x.numel():
            idx = _first(x.bool()) or tuple([0] * x.dim())
            out.append(Case(spec, "mask", f"{lab} holds 0.5", new(**{a.name: _set(x.float(), idx, 0.5)}), "error", lab))
            out.append(Case(spec, "mask", f"{lab} all False", new(**{a.name: torch.zeros_like(x)}),
                            "equal" if a.allow_empty else "error", lab))
        # non-finite / range
        if a.kind in ("float", "logp", "ent", "real") and x.numel():
            w = a.where(d0) if a.where is not None else torch.ones_like(x, dtype=torch.bool)
            w = w.expand_as(x) if w.dim() == x.dim() else w
            if spec.name == "entropy_from_hidden" and a.name == "hidden":
                w = w[..., None].expand_as(x)
            i_in, i_out = _first(w), _first(~w)
            if i_in is not None:
                for v in (float("nan"), float("inf")):
                    out.append(Case(spec, "non-finite", f"{lab} {v} where used", new(**{a.name: _set(x, i_in, v)}),
                                    "error", lab))
                if a.kind in ("logp", "ent"):
                    v = 0.5 if a.kind == "logp" else -0.5
                    out.append(Case(spec, "range", f"{lab} {v} where used", new(**{a.name: _set(x, i_in, v)}),
                                    "error", lab))
            if i_out is not None:
                out.append(Case(spec, "non-finite", f"{lab} NaN where unused",
                                new(**{a.name: _set(x, i_out, float("nan"))}), "equal"))
                if a.kind == "logp":
                    out.append(Case(spec, "range", f"{lab} +5 where unused", new(**{a.name: _set(x, i_out, 5.0)}),
                                    "equal"))
        if a.kind == "int" and x.numel():
            te = d0["expert_logp"].shape[1]
            m0 = d0["mask"].bool()[0]
            inside = bool(m0[te:te + 1].any())                                  # on-policy position te: e_t unknown
            out.append(Case(spec, "range", f"{lab} > width", new(**{a.name: _set(x, 0, te + 1)}),
                            "error" if inside else "equal", lab))
            out.append(Case(spec, "range", f"{lab} < 0", new(**{a.name: _set(x, 0, -1)}), "error", lab))
        # mixed dtype / device
        if not a.ref:
            if a.kind in ("float", "logp", "ent"):
                ok = spec.name == "entropy_from_hidden" and a.name in ("lm_head_weight", "bias")
                out.append(Case(spec, "mixed-dtype", f"{lab} float64", new(**{a.name: x.double()}),
                                "equal" if ok else "error", lab))
            out.append(Case(spec, "mixed-device", f"{lab} on meta", new(**{a.name: x.to("meta")}), "error", lab))
    for name, bad in spec.scalars.items():
        for v in bad:
            out.append(Case(spec, "range", f"{name}={v!r}", new(**{name: v}), "error", SCALAR_LABELS.get(name, name)))
    if floats:
        for dt in HALF:
            out.append(Case(spec, "half", f"all floats {dt}", new(**{a.name: d0[a.name].to(dt) for a in floats}),
                            "equal"))
        out.append(Case(spec, "requires-grad", "every float input requires grad",
                        new(**{a.name: d0[a.name].clone().requires_grad_(True) for a in floats}), "equal",
                        const=tuple(a.name for a in floats if a.const)))
    return out


# ------------------------------------------------------------------------------------------------ running
def _close(a, b, rtol, atol=1e-5):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
    if torch.is_tensor(a):
        b = torch.as_tensor(b)
        if a.shape != b.shape:
            return False
        if a.dtype == torch.bool or b.dtype == torch.bool:
            return bool((a == b).all())
        return bool(torch.isfinite(a).all()) and torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)
    a, b = float(a), float(b)
    return math.isfinite(a) and abs(a - b) <= atol + rtol * abs(b)


def _finite_out(r) -> bool:
    if r is None or isinstance(r, bool):
        return True
    if isinstance(r, dict):
        return all(_finite_out(v) for v in r.values())
    if isinstance(r, (list, tuple)):
        return all(_finite_out(v) for v in r)
    if torch.is_tensor(r):
        return r.dtype == torch.bool or bool(torch.isfinite(r.detach()).all())
    return math.isfinite(float(r))


def _equal(case: Case):
    """(ok, why) for a case expected to give the reference's result."""
    spec, d = case.spec, dict(case.d)
    half = any(torch.is_tensor(v) and v.dtype in HALF for v in d.values())
    bf16 = any(torch.is_tensor(v) and v.dtype == torch.bfloat16 for v in d.values())
    rtol = max(spec.rtol, 5e-2 if half and spec.name == "entropy_from_hidden" else
               (1e-2 if bf16 else (2e-3 if half else 0)))
    if spec.var is not None:
        d[spec.var] = d[spec.var].detach().clone().requires_grad_(True)
    res = spec.call(spec.fn, d)
    ref_d = dict(d)
    if spec.var is not None:
        ref_d[spec.var] = d[spec.var].detach().double().requires_grad_(True)
    ref = REFS[spec.name](ref_d)
    if not _finite_out(res if spec.out != "loss" else res[1]) or (spec.out == "loss" and not _finite_out(res[0])):
        return False, "non-finite result"
    if spec.out == "loss":
        loss, info = res
        if not _close(loss.detach(), ref[0].detach(), rtol):
            return False, f"loss {float(loss):.6g} != reference {float(ref[0]):.6g}"
        for k, v in ref[1].items():
            if not _close(info.get(k, "missing") if k in info else "missing", v, rtol) if k in info else True:
                return False, f"info[{k}] {info.get(k)} != reference {v}"
            if k not in info:
                return False, f"info[{k}] missing"
        loss.backward()
        ref[0].backward()
        g, gr = d[spec.var].grad, ref_d[spec.var].grad
        if g is None or not bool(torch.isfinite(g).all()) or not torch.allclose(g.double(), gr, rtol=rtol, atol=1e-5):
            return False, "gradient differs from the reference's"
        for name in case.const:
            if d[name].grad is not None:
                return False, f"a gradient reached {name}, a constant"
        return True, ""
    if spec.out == "tensor" and torch.is_tensor(res) and res.requires_grad:
        if spec.var is None:
            return False, "probe output requires grad"
    if spec.out == "tensor" and spec.var is not None:
        res.backward()
        ref.backward()
        if not torch.allclose(d[spec.var].grad.double(), ref_d[spec.var].grad, rtol=rtol, atol=1e-5):
            return False, "gradient differs from the reference's"
    if spec.out == "dict":
        for k, v in ref.items():
            if k not in res:
                return False, f"[{k}] missing"
            if not _close(res[k], v, rtol):
                return False, f"[{k}] {res[k]} != reference {v}"
        return True, ""
    return (_close(res.detach() if torch.is_tensor(res) else res, ref.detach() if torch.is_tensor(ref) else ref, rtol),
            "result differs from the reference's")


def outcome(case: Case) -> tuple[str, str]:
    """("ok-error" | "ok-equal" | "silent" | "unclear" | "rejected", detail)."""
    try:
        if case.expect == "equal":
            ok, why = _equal(case)
            return ("ok-equal", "") if ok else ("silent", why)
        case.spec.call(case.spec.fn, case.d)
    except ValueError as e:
        msg = str(e)
        if case.expect == "equal":
            return "rejected", msg
        return ("ok-error", msg) if msg.startswith(f"{case.arg}:") else ("unclear", f"names another argument: {msg}")
    except Exception as e:  # noqa: BLE001 - any other exception is an unclear error
        return "unclear", f"{type(e).__name__}: {e}"
    return "silent", "accepted without an error"
