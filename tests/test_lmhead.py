"""Chunked LM-head log-probs/entropy (calibrl.lmhead) equal the full-vocabulary path (the sampler's definition in
calibrl.rollout.token_logprobs) in value and gradient, and never keep a [N,T,V] tensor for the backward."""
from __future__ import annotations

import pytest
import torch

from calibrl.lmhead import head_token_logprobs, output_head
from calibrl.logprobs import token_logprobs
from calibrl.tiny import tiny_path

ASSET = tiny_path()


def full_path(hidden, weight, targets, mask, bias=None, **kw):
    """The reference: full logits [N,T,V] in the input dtype, then the sampler's log_softmax."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    kw.setdefault("suppress_token_ids", ())
    return token_logprobs(logits, targets, mask, **kw)


def compare(hidden, weight, targets, mask, *, bias=None, tol=1e-5, gtol=1e-5, chunk_tokens=3, **kw):
    """Values and gradients (hidden, weight, bias) of a random linear functional of logp and entropy."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(targets.shape, generator=gen)
    b = torch.randn(targets.shape, generator=gen)
    grads = []
    outs = []
    for fn in (lambda *x, **k: full_path(*x, **k), lambda *x, **k: head_token_logprobs(*x, chunk_tokens=chunk_tokens, **k)):
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(weight.requires_grad)
        bb = None if bias is None else bias.detach().clone().requires_grad_(True)
        lp, ent = fn(h, w, targets, mask, bias=bb, return_entropy=True, **kw)
        (lp * a + ent * b).sum().backward()
        outs.append((lp.detach(), ent.detach()))
        grads.append((h.grad, w.grad, None if bb is None else bb.grad))
    (lp0, e0), (lp1, e1) = outs
    assert torch.isfinite(lp1).all() and torch.isfinite(e1).all()
    torch.testing.assert_close(lp1, lp0, atol=tol, rtol=0)
    torch.testing.assert_close(e1, e0, atol=tol, rtol=0)
    for g0, g1 in zip(grads[0], grads[1]):
        if g0 is None:
            assert g1 is None
            continue
        torch.testing.assert_close(g1.float(), g0.float(), atol=gtol, rtol=gtol)
    return outs[1], grads[1]


def ragged_mask(n, t, gen):
    lens = torch.randint(1, t + 1, (n,), generator=gen)
    return torch.arange(t)[None] < lens[:, None]


@pytest.fixture(scope="module")
def tiny_model():
    if not (ASSET / "config.json").exists():
        pytest.skip("shipped tiny model missing")
    from calibrl.models import load_policy

    return load_policy("tiny")


def test_tiny_model_real_head_and_hidden(tiny_model):
    """Real final hidden states of the shipped model, its real (tied) head and suppressed ids, temperature != 1."""
    model = tiny_model.model
    weight, bias = output_head(model)
    gen = torch.Generator().manual_seed(0)
    vocab = weight.shape[0]
    ids = torch.randint(0, 400, (3, 9), generator=gen)
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=ids).last_hidden_state     # [3,9,H] after the final norm
        torch.testing.assert_close(model.lm_head(hidden), hidden @ weight.T)       # the head is what we think
    targets = torch.randint(0, vocab, (3, 9), generator=gen)
    sup = list(tiny_model.suppress_token_ids)
    targets[torch.isin(targets, torch.tensor(sup))] = 5
    mask = ragged_mask(3, 9, gen)
    for temp in (1.0, 0.7):
        compare(hidden, weight.detach().requires_grad_(True), targets, mask, bias=bias,
                suppress_token_ids=sup, temperature=temp)


def test_full_qwen_vocabulary_random_head():
    """V = 151,936 (Qwen2.5-VL) with a bias, suppressed ids, temperature 1.3, several chunks."""
    gen = torch.Generator().manual_seed(0)
    vocab, hsize = 151_936, 32
    hidden = torch.randn(2, 5, hsize, generator=gen)
    weight = torch.randn(vocab, hsize, generator=gen) * 0.3
    weight.requires_grad_(True)
    bias = torch.randn(vocab, generator=gen) * 0.1
    targets = torch.randint(0, vocab, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    sup = [151_643, 151_655, 151_656, 3, 7]
    compare(hidden, weight, targets, mask, bias=bias, suppress_token_ids=sup, temperature=1.3, chunk_tokens=4)


def test_softmax_row_blocks_inside_chunks():
    """Chunks longer than SOFTMAX_ROWS (full and partial row blocks, a short last chunk): values and gradients equal
    the full path, with entropy, a bias, suppressed ids and a temperature."""
    from calibrl.lmhead import SOFTMAX_ROWS

    gen = torch.Generator().manual_seed(7)
    n, t, hsize, vocab = 3, 40, 16, 700
    hidden = torch.randn(n, t, hsize, generator=gen)
    weight = (torch.randn(vocab, hsize, generator=gen) * 0.5).requires_grad_(True)
    bias = torch.randn(vocab, generator=gen) * 0.1
    targets = torch.randint(0, vocab, (n, t), generator=gen)
    mask = torch.arange(t)[None] < torch.tensor([t, t - 3, t - 10])[:, None]       # M = 107 real positions
    chunk = SOFTMAX_ROWS + SOFTMAX_ROWS // 2 + 3                                      # 51: blocks of 32 and 19
    assert int(mask.sum()) % chunk and int(mask.sum()) > 2 * chunk
    compare(hidden, weight, targets, mask, bias=bias, suppress_token_ids=[2, 5], temperature=0.8, chunk_tokens=chunk)


def test_masked_positions_are_zero_never_nan():
    """Pads may carry any id (-100, a suppressed id, out of range): 0 value, 0 gradient, never NaN/-inf."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 4, 8, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen)
    targets = torch.tensor([[1, 2, -100, 999], [4, 3, 3, 3]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    lp, ent = head_token_logprobs(hidden, weight, targets, mask, suppress_token_ids=[3], return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (lp[~mask.bool()] == 0).all() and (ent[~mask.bool()] == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (hidden.grad[~mask.bool()] == 0).all() and torch.isfinite(hidden.grad).all()
    lp0, ent0 = head_token_logprobs(hidden, weight, targets, torch.zeros(2, 4, dtype=torch.bool), return_entropy=True)
    assert (lp0 == 0).all() and (ent0 == 0).all()


def test_suppressed_target_at_real_position_is_minus_inf_like_the_sampler():
    hidden = torch.randn(1, 2, 8)
    weight = torch.randn(20, 8)
    targets = torch.tensor([[3, 4]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    lp, _ = head_token_logprobs(hidden, weight, targets, mask, suppress_token_ids=[3])
    ref, _ = full_path(hidden, weight, targets, mask, suppress_token_ids=[3])
    assert lp[0, 0] == float("-inf") and ref[0, 0] == float("-inf")
    torch.testing.assert_close(lp[0, 1], ref[0, 1])


def test_entropy_of_suppressed_uniform_is_log_of_remaining():
    """Hand value: zero logits over V = 10 with 2 suppressed ids -> entropy log 8, log-prob -log 8."""
    hidden = torch.zeros(1, 1, 4)
    weight = torch.randn(10, 4)
    lp, ent = head_token_logprobs(hidden, weight, torch.tensor([[0]]), torch.ones(1, 1), suppress_token_ids=[8, 9],
                                  return_entropy=True, temperature=0.5)
    torch.testing.assert_close(ent, torch.tensor([[torch.log(torch.tensor(8.0)).item()]]))
    torch.testing.assert_close(lp, -ent)


def test_frozen_weight_gets_no_gradient():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 8, generator=gen)
    weight = torch.randn(40, 8, generator=gen)  # requires_grad False: the tied embedding under LoRA
    targets = torch.randint(0, 40, (2, 3), generator=gen)
    (_, (gh, gw, _)) = compare(hidden, weight, targets, torch.ones(2, 3, dtype=torch.bool), chunk_tokens=2)
    assert gw is None and gh is not None


def test_logp_only_gradient_and_single_chunk():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 4, 8, generator=gen)
    weight = torch.randn(30, 8, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 30, (3, 4), generator=gen)
    mask = ragged_mask(3, 4, gen)
    grads = []
    for fn in (full_path, lambda *x, **k: head_token_logprobs(*x, chunk_tokens=1000, **k)):
        h = hidden.clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(True)
        lp, ent = fn(h, w, targets, mask, suppress_token_ids=[1], temperature=0.9)
        assert ent is None
        lp.sum().backward()
        grads.append((lp.detach(), h.grad, w.grad))
    for x0, x1 in zip(*grads):
        torch.testing.assert_close(x1, x0, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_float32_softmax():
    """bf16 hidden/weight (a GPU model): the logits matmul in bf16 like the model's head, the softmax in float32."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 6, 16, generator=gen).bfloat16()
    weight = (torch.randn(300, 16, generator=gen) * 0.5).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 300, (2, 6), generator=gen)
    mask = ragged_mask(2, 6, gen)
    (lp, ent), (gh, gw, _) = compare(hidden, weight, targets, mask, suppress_token_ids=[0, 1], temperature=0.8,
                                     tol=1e-4, gtol=2e-2)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16


def test_backward_keeps_no_vocabulary_sized_tensor():
    """Every tensor saved for the backward is O(M*H + V*H), none of size M*V (the full path saves several)."""
    gen = torch.Generator().manual_seed(6)
    n, t, hsize, vocab = 4, 16, 8, 5000
    hidden = torch.randn(n, t, hsize, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, hsize, generator=gen)
    targets = torch.randint(0, vocab, (n, t), generator=gen)
    mask = torch.ones(n, t, dtype=torch.bool)

    def largest_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            lp, ent = fn(hidden, weight, targets, mask, return_entropy=True)
            (lp.sum() + ent.sum()).backward()
        return max(sizes)

    assert largest_saved(full_path) >= n * t * vocab
    assert largest_saved(lambda *x, **k: head_token_logprobs(*x, chunk_tokens=8, **k)) <= vocab * hsize


@pytest.mark.parametrize("bad, match", [
    (dict(hidden=torch.randn(2, 3)), "hidden"),
    (dict(hidden=torch.randint(0, 3, (2, 3, 8))), "hidden"),
    (dict(weight=torch.randn(40, 7)), "weight"),
    (dict(weight=torch.randn(40, 8).double()), "weight"),
    (dict(targets=torch.zeros(2, 4, dtype=torch.long)), "targets"),
    (dict(targets=torch.zeros(2, 3)), "targets"),
    (dict(targets=torch.full((2, 3), 40)), "targets"),
    (dict(mask=torch.full((2, 3), 2)), "mask"),
    (dict(mask=torch.ones(2, 4)), "mask"),
    (dict(bias=torch.randn(39)), "bias"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(chunk_tokens=0), "chunk_tokens"),
    (dict(suppress_token_ids=[40]), "suppress_token_ids"),
    (dict(suppress_token_ids=list(range(40))), "suppress_token_ids"),
])
def test_validation_names_the_argument(bad, match):
    args = dict(hidden=torch.randn(2, 3, 8), weight=torch.randn(40, 8), targets=torch.zeros(2, 3, dtype=torch.long),
                mask=torch.ones(2, 3, dtype=torch.bool))
    args.update(bad)
    kw = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "targets", "mask")}
    with pytest.raises(ValueError, match=match):
        head_token_logprobs(args["hidden"], args["weight"], args["targets"], args["mask"], **kw)


def test_plain_head_accepts_linear_and_tensor_only():
    from calibrl.lmhead import plain_head

    lin = torch.nn.Linear(4, 10)
    w, b = plain_head(lin)
    assert w is lin.weight and b is lin.bias
    assert plain_head(lin.weight)[0] is lin.weight
    assert plain_head(torch.nn.Sequential(lin)) is None
    with pytest.raises(ValueError, match="model"):
        output_head(torch.nn.Module())


@pytest.mark.parametrize("sampler", ["shared-prefix", "generate"])
def test_trainer_path_chunked_equals_full_on_tiny_model(tiny_model, sampler, monkeypatch):
    """rows_logprobs (the trainer's old/expert and training forwards) with the chunked head forced on equals the
    full-vocabulary path: log-probs, entropy and the gradient of every trainable parameter, <= 1e-5."""
    from calibrl import logprobs
    from calibrl.models import load_policy
    from calibrl.rollout import encode_prompts, rows_logprobs
    from calibrl.tasks import DEFAULT_TASK, sample
    from calibrl.trainer import lora_config
    from calibrl.config import TrainConfig

    torch.manual_seed(0)
    pol = load_policy("tiny", lora=lora_config(TrainConfig()))
    exs = [sample(DEFAULT_TASK, i, 0) for i in range(2)]
    inputs = encode_prompts(pol, [e["image"] for e in exs], [e["question"] for e in exs])
    gen = torch.Generator().manual_seed(0)
    comp = torch.randint(0, 400, (4, 6), generator=gen)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    rows = torch.tensor([0, 0, 1, 1])
    params = [p for p in pol.model.parameters() if p.requires_grad]
    outs = []
    for threshold in (10**18, 0):  # full path, then the chunked head forced on
        monkeypatch.setattr(logprobs, "CHUNKED_MIN_LOGITS", threshold)
        for p in params:
            p.grad = None
        lp, ent = rows_logprobs(pol, inputs, rows, comp, mask, temperature=0.8, return_entropy=True, sampler=sampler)
        (lp.sum() + 0.3 * ent.sum()).backward()
        outs.append((lp.detach(), ent.detach(), [p.grad.clone() for p in params]))
    (lp0, e0, g0), (lp1, e1, g1) = outs
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_large_problems_take_the_chunked_head(monkeypatch):
    """Above CHUNKED_MIN_LOGITS the seam calls calibrl.lmhead (no [N,T,V] tensor); below it the full path."""
    from calibrl import lmhead, logprobs

    calls = []
    real = lmhead.head_token_logprobs
    monkeypatch.setattr(lmhead, "head_token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    head = torch.nn.Linear(8, 50, bias=False)
    hidden, targets, mask = torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    logprobs.head_token_logprobs(hidden, head, targets, mask, suppress_token_ids=[])
    assert not calls
    monkeypatch.setattr(logprobs, "CHUNKED_MIN_LOGITS", 2 * 3 * 50 - 1)
    logprobs.head_token_logprobs(hidden, head, targets, mask, suppress_token_ids=[])
    assert calls == [1]
