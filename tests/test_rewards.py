import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrl.rewards import accuracy_reward, extract_answer, format_reward, normalize_answer, score


# ------------------------------------------------------------------ extraction
@pytest.mark.parametrize("text,expected", [
    ("<think>a</think><answer>red</answer>", "red"),
    ("<answer>  4 \n</answer>", "4"),
    ("<ANSWER>Blue</Answer>", "Blue"),                      # tags case-insensitive, content kept
    ("<answer>3</answer> then <answer>4</answer>", "4"),    # last wins
    ("<answer>3 <answer>4</answer>", "4"),                  # nested: innermost-last open
    ("<answer>3</answer><answer>4", "3"),                   # unclosed trailing tag ignored
    ("<answer>4", None),
    ("4</answer>", None),
    ("<answer></answer>", None),
    ("<answer>   </answer>", None),
    ("no tags at all", None),
    ("", None),
    (None, None),
    (42, None),
    ("<think>x</think><answer>yellow</answer>\nblah blah", "yellow"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("raw,expected", [
    ("03", "3"), ("+3", "3"), ("3.0", "3"), ("3.00", "3"), ("-0", "0"), ("16.910", "16.91"), ("0.50", "0.5"),
    ("16.91°", "16.91"), (".5", "0.5"), ("-.50", "-0.5"), ("50%", "50"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("B)", "B"),
    ("Red", "red"), (" RED. ", "red"), ('"green"', "green"), ("grey", "gray"), ("Gray!", "gray"),
    ("the red one", "the red one"), ("(7.7650, 7.882)", "(7.765, 7.882)"), ("7.765,7.882", "(7.765, 7.882)"),
    ("light   blue", "light blue"), ("", None), ("  .  ", None), (None, None),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_rejects_non_str():
    with pytest.raises(ValueError, match="s: expected a str or None"):
        normalize_answer(3)


# ------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("pred,gold,acc", [
    ("3", "3", 1.0), ("03", "3", 1.0), ("3.0", "3", 1.0), ("3.4", "3", 0.0), ("4", "3", 0.0),
    ("16.909", "16.91°", 1.0), ("16.914°", "16.91°", 1.0), ("16.916", "16.91°", 0.0), ("16.9", "16.91°", 0.0),
    ("5.501", "5.500", 0.0), ("5.5004", "5.500", 1.0), ("5.5", "5.500", 1.0), (".5", "0.5", 1.0), ("5", "0.5", 0.0),
    ("(7.765, 7.882)", "(7.765, 7.882)", 1.0), ("7.7651,7.882", "(7.765, 7.882)", 1.0),
    ("(7.765, 7.892)", "(7.765, 7.882)", 0.0), ("(7.765)", "(7.765, 7.882)", 0.0),
    ("(b)", "B", 1.0), ("C", "B", 0.0), ("Red", "red", 1.0), ("grey", "gray", 1.0), ("the red one", "red", 0.0),
    ("red or blue", "red", 0.0), ("nan", "3", 0.0), ("inf", "3", 0.0), ("three", "3", 0.0),
])
def test_accuracy_values(pred, gold, acc):
    assert accuracy_reward(f"<think> t </think><answer>{pred}</answer>", gold) == acc


def test_think_leak_cases_from_peers():
    # math-verify on the whole completion gets both of these wrong; we read only the last <answer>.
    assert accuracy_reward("<think>I see 4 objects, no wait</think><answer>5</answer>", "4") == 0.0
    assert accuracy_reward("<think>I count 3 cubes and 1 sphere</think><answer>4</answer>", "4") == 1.0
    assert accuracy_reward("<think>the answer is 4</think>", "4") == 0.0
    assert accuracy_reward("<answer>4</answer>", "4") == 1.0  # no think: still correct, format fails
    assert format_reward("<answer>4</answer>") == 0.0


def test_gold_must_be_nonempty_str():
    for bad in (3, None, 3.0, ["3"]):
        with pytest.raises(ValueError, match="gold: expected a str"):
            score("<answer>3</answer>", bad)
    with pytest.raises(ValueError, match="gold: expected a non-empty answer"):
        accuracy_reward("<answer>3</answer>", "  ")


# ------------------------------------------------------------------ format
@pytest.mark.parametrize("text,fmt", [
    ("<think> a </think><answer> b </answer>", 1.0),
    ("\n <think>a</think>\n\n<answer>b</answer>\n", 1.0),      # whitespace around / between allowed
    ("<think>multi\nline</think><answer>b</answer>", 1.0),
    ("<think>a</think><answer>b</answer> extra", 0.0),          # text after </answer>
    ("<think>a</think> so <answer>b</answer>", 0.0),             # text between (official regex allows it)
    ("pre <think>a</think><answer>b</answer>", 0.0),
    ("<think>a<answer>b</answer>", 0.0),                         # unclosed think
    ("<think>a</think><answer>b", 0.0),                          # unclosed answer
    ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),                 # tags must be lower-case for the format
    ("<answer>b</answer><think>a</think>", 0.0),
    ("", 0.0), (None, 0.0), (17, 0.0),
])
def test_format_reward(text, fmt):
    assert format_reward(text) == fmt


# ------------------------------------------------------------------ score
def test_score_values_match_official_scheme():
    assert score("<think> x </think><answer> red </answer>", "red") == dict(reward=1.1, acc=1.0, fmt=1.0, passed=True)
    assert score("<think> x </think><answer> blue </answer>", "red") == dict(reward=0.1, acc=0.0, fmt=1.0, passed=False)
    s = score("<answer>red</answer> and more", "red")
    assert s == dict(reward=1.0, acc=1.0, fmt=0.0, passed=True)
    assert score(None, "red") == dict(reward=0.0, acc=0.0, fmt=0.0, passed=False)
    assert score("", "red")["reward"] == 0.0
    assert score("<think>a</think><answer>3</answer><answer>4</answer>", "4")["acc"] == 1.0


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(), st.binary().map(lambda b: b.decode("latin-1")),
                 st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "red", "3", " ", "\n",
                                           "<", ">", "/"]), max_size=12).map("".join)))
def test_score_never_raises_on_weird_text(text):
    s = score(text, "red")
    assert s["reward"] in (0.0, 0.1, 1.0, 1.1) and s["passed"] == (s["acc"] == 1.0)
    assert s["reward"] == pytest.approx(s["acc"] + 0.1 * s["fmt"])
    if s["acc"] == 1.0:
        assert normalize_answer(extract_answer(text)) == "red"


# ------------------------------------------------------------------ issue 9: think never graded, one block each, ASCII
@pytest.mark.parametrize("text,expected", [
    ("<think><answer>4</answer></think>", None),                          # only inside thinking
    ("<think>maybe <answer>4</answer></think><answer>5</answer>", "5"),
    ("<think>a <answer>4</answer>", None),                                # unclosed think runs to the end
    ("<answer>4</answer><think>still thinking <answer>5</answer>", "4"),  # the answer before thinking counts
    ("prompt-opened thinking <answer>4</answer></think> done", None),     # a </think> closing nothing
    ("reasoning <answer>4</answer></think><answer>6</answer>", "6"),
    ("<think>a</think><answer>3</answer><think><answer>9</answer></think>", "3"),
    ("<THINK><answer>4</answer></Think>", None),                          # think tags case-insensitive too
])
def test_nothing_inside_think_is_graded(text, expected):
    assert extract_answer(text) == expected
    if expected is None:
        assert accuracy_reward(text, "4") == 0.0


@pytest.mark.parametrize("text", [
    "<think>a</think><answer>1</answer><answer>2</answer>",   # two answer blocks
    "<think>a</think><think>b</think><answer>1</answer>",     # two think blocks
    "<think>a <answer>1</answer></think><answer>1</answer>",  # an answer tag inside the think block
    "<think>a <ANSWER>1</ANSWER></think><answer>1</answer>",  # ... in any case
    "<think>a</think><answer>1 <think></answer>",             # a think tag inside the answer
    "<think>a</think><answer>1</answer></answer>",
    "<think><think>a</think></think><answer>1</answer>",
])
def test_format_needs_exactly_one_think_and_one_answer_block(text):
    assert format_reward(text) == 0.0


@pytest.mark.parametrize("pred", ["٣", "３", "३", "߃", "𝟑", "3٣", "٠٣", "٣.٠", "(٣, 4)"])
def test_non_ascii_digits_are_not_numbers(pred):
    gold = "(3, 4)" if pred.startswith("(") else "3"
    assert accuracy_reward(f"<think>t</think><answer>{pred}</answer>", gold) == 0.0
    assert normalize_answer(pred) not in ("3", "(3, 4)")


_MB = 1_000_000
_ADVERSARIAL = {
    "think-then-answer-tails": "<think></think><answer>" + "</answer>x" * (_MB // 10),
    "many-think-closes": "<think>" + "</think>\n" * (_MB // 9),
    "many-opens": "<think>" * (_MB // 7),
    "answer-opens": "<answer>" * (_MB // 8) + "</answer>",
    "long-think": "<think>" + "a" * _MB + "</think><answer>3</answer>",
    "long-digits": "<think>t</think><answer>" + "1" * _MB + "x</answer>",
    "trailing-percent": "<think>t</think><answer>5" + "%" * _MB + "</answer>",
    "long-tuple": "<think>t</think><answer>(" + "1," * (_MB // 2) + "3)</answer>",
    "whitespace": "<think>" + " \n" * (_MB // 2) + "</think> <answer>3</answer>",
    "lt-soup": "<" * _MB,
    "closes-then-opens": "<think>" + "</think><answer>" * (_MB // 17),  # quadratic for the old format regex
}


@pytest.mark.parametrize("name", sorted(_ADVERSARIAL))
def test_one_megabyte_completion_scores_in_well_under_a_second(name):
    import time

    text = _ADVERSARIAL[name]
    assert len(text) >= 0.9 * _MB
    seconds = []
    for _ in range(3):  # best of 3, in process CPU time: the CI machine is shared
        t0 = time.process_time()
        s = score(text, "3")
        seconds.append(time.process_time() - t0)
        if seconds[-1] < 0.5:
            break
    seconds = min(seconds)
    assert seconds < 0.5, f"{name}: {seconds:.2f} s CPU for {len(text)} chars"
    assert s["fmt"] == (1.0 if name in ("long-think", "whitespace", "long-digits", "trailing-percent", "long-tuple")
                        else 0.0)
    assert s["acc"] == (1.0 if name in ("long-think", "whitespace") else 0.0)
