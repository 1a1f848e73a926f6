"""Verifier behaviour: every built-in, the worker pool's real kill, the composite reward, user functions."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

from posttrain.rewards import (
    Score,
    VerifierError,
    batch,
    build_reward,
    extract_answer,
    extract_answers,
    load,
    score_all,
)
from posttrain.rewards.format import soft_overlong_penalty
from posttrain.rewards.math import MathVerifier
from posttrain.rewards.pool import WorkerPool, WorkerTaskError


@pytest.fixture(scope="module")
def math_v():
    with MathVerifier(workers=2, timeout=3.0) as v:
        yield v


# --- extraction ----------------------------------------------------------------------------------------


def test_extract_scans_nested_braces():
    assert extract_answer(r"so \boxed{\frac{1}{\sqrt{2}}} done") == r"\frac{1}{\sqrt{2}}"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces are not grouping
    assert extract_answer(r"\boxed{x^{2^{3}}}.") == "x^{2^{3}}"


def test_extract_last_answer_and_formats():
    assert extract_answer(r"\boxed{5} so indeed \boxed{5.0}") == "5.0"  # same value: not a hedge
    assert extract_answer("<answer> 7 </answer>") == "7"
    assert extract_answer(r"<answer>The answer is \boxed{9}</answer>") == "9"
    assert extract_answer("Final: 12", pattern=r"Final: (\d+)") == "12"
    assert extract_answer(r"\boxed{\frac12") is None  # unclosed (truncated) box is no answer
    assert extract_answer("just 42") is None
    assert extract_answer(r"<think>\boxed{1}</think><answer>2</answer>") == "2"  # reasoning boxes ignored
    assert extract_answer(r"\boxed{3}", mode="answer_tag") is None


def test_extract_hedges():
    for text in (r"\boxed{1} or \boxed{2}", "<answer>1</answer><answer>2</answer>", r"\boxed{1} <answer>2</answer>"):
        found = extract_answers(text)
        assert found.hedged and found.answer is None, text


def test_extract_caps_huge_input_keeping_the_tail():
    t0 = time.perf_counter()
    assert extract_answer("x" * 2_000_000 + r"\boxed{7}") == "7"
    assert extract_answer(r"\boxed{7}" + "x" * 2_000_000) is None  # beyond the 10k-char tail
    assert extract_answer(r"\boxed{7}" + "x" * 50, max_chars=20) is None
    assert time.perf_counter() - t0 < 1.0


# --- math ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, gold",
    [
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{\frac12}", "0.5"),
        (r"\boxed{\dfrac{1}{2}}", "1/2"),
        (r"\boxed{2/4}", r"\frac12"),
        (r"The answer is $\boxed{42}$.", "42"),
        (r"\boxed{-3}", "-3.0"),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
        (r"<answer>\{3, 2\}</answer>", r"\{2,3\}"),
        (r"\boxed{50\%}", "0.5"),
    ],
)
def test_math_equivalent_forms_score_1(math_v, completion, gold):
    assert math_v(completion, answer=gold) == 1.0


@pytest.mark.parametrize(
    "completion, gold, reason",
    [
        (r"\boxed{0.6}", r"\frac{1}{2}", "mismatch"),
        (r"\boxed{\sqrt{3}}", r"\sqrt{2}", "not_equivalent"),
        (r"\boxed{1} or \boxed{2}", "2", "hedged"),
        (r"\boxed{2} or \boxed{1}", "2", "hedged"),
        ("<answer>1</answer> no wait <answer>2</answer>", "2", "hedged"),
        ("The answer is 2. <answer>3</answer>", "2", "mismatch"),
        ("The answer is 2.", "2", "no_answer"),
        ("", "2", "no_answer"),
    ],
)
def test_math_wrong_or_hedged_scores_0(math_v, completion, gold, reason):
    score = math_v(completion, answer=gold)
    assert score == 0.0 and score.reason == reason


def test_math_gold_column_and_boxed_gold(math_v):
    assert math_v(r"\boxed{4}", solution=r"... so \boxed{4}", answer="9") == 0.0
    v = MathVerifier(answer_column="solution", workers=1)
    assert v(r"\boxed{4}", solution=r"Reference: 2+2 = \boxed{4}") == 1.0


def test_math_tolerance():
    loose = MathVerifier(tolerance=1e-6, workers=1)
    exact = MathVerifier(tolerance=0.0, workers=1)
    assert loose(r"\boxed{0.3333333}", answer=r"\frac13") == 1.0
    assert loose(r"\boxed{0.333}", answer=r"\frac13") == 0.0
    assert exact(r"\boxed{0.3333333}", answer=r"\frac13") == 0.0


def test_math_huge_completion_is_capped(math_v):
    t0 = time.perf_counter()
    assert math_v("blah " * 400_000 + r"\boxed{6}", answer="6") == 1.0
    assert math_v(r"\boxed{6}" + " blah" * 400_000, answer="6") == 0.0
    assert time.perf_counter() - t0 < 2.0


def test_math_never_evaluates_model_text(math_v, tmp_path):
    marker = tmp_path / "pwned"
    for completion in (
        rf"\boxed{{__import__('os').system('touch {marker}')}}",
        rf"<answer>__import__('pathlib').Path('{marker}').write_text('x') and 1</answer>",
    ):
        assert math_v(completion, answer="0") == 0.0
        assert math_v(completion, answer="1") == 0.0
    assert not marker.exists()


def test_math_batch_preserves_order_across_fast_and_slow_paths(math_v):
    completions = [r"\boxed{\sqrt{8}}", r"\boxed{3}", r"\boxed{x+1}", r"\boxed{4}", r"\boxed{1+x}"]
    golds = [r"2\sqrt{2}", "3", "x+2", "5", "x+1"]
    scores = math_v.score_batch(completions, [{"answer": g} for g in golds])
    assert [float(s) for s in scores] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert [s.reason for s in scores] == ["equivalent", "exact", "not_equivalent", "mismatch", "equivalent"]


def test_math_missing_gold_column_raises_with_row():
    with pytest.raises(VerifierError, match="row 0.*'answer'"):
        MathVerifier(workers=1).score_batch([r"\boxed{1}"], [{"label": "1"}])


def test_math_timeout_kills_the_worker_and_the_pool_recovers():
    with MathVerifier(workers=1, timeout=0.5) as v:
        assert v(r"\boxed{\sqrt{8}}", answer=r"2\sqrt{2}") == 1.0  # pool up and warm
        pid = v.pool._workers[0].process.pid
        t0 = time.perf_counter()
        score = v(r"\boxed{9^{9^{9^{9}}}}", answer="3")  # sympy cannot finish this; SIGALRM cannot stop it in time
        elapsed = time.perf_counter() - t0
        assert score == 0.0 and score.reason == "timeout"
        assert elapsed < 5.0
        assert v.restarts == 1
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the stuck worker is gone (killed and reaped)
        assert v(r"\boxed{2\sqrt{2}}", answer=r"\sqrt{8}") == 1.0  # the replacement works


def test_pool_kills_a_sleeping_task_and_keeps_order():
    with WorkerPool(1, timeout=0.3) as pool:
        outcomes = pool.run(time.sleep, [(0,), (60,), (0,)])  # time.sleep: a stuck task, no test hook needed
        assert [o.status for o in outcomes] == ["ok", "timeout", "ok"]
        assert pool.restarts == 1
        assert [o.value for o in pool.run(abs, [(-1,), (-2,), (-3,)])] == [1, 2, 3]


def test_a_worker_whose_parent_drops_the_pipe_ends_quietly(capfd):
    """The parent closing its end with the worker's message unread resets the connection: the worker
    ends with status 0 and prints no traceback (seen in the demo's logs between two GRPO stages)."""
    import multiprocessing as mp

    from posttrain.rewards.pool import _worker_main

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    worker = ctx.Process(target=_worker_main, args=(child, None, None), daemon=True)
    worker.start()
    child.close()
    assert parent.poll(60)  # its "ready" is waiting, unread
    parent.close()
    worker.join(60)
    assert worker.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err


def test_pool_reraises_task_exceptions_with_the_remote_traceback():
    with WorkerPool(1, timeout=5) as pool:
        with pytest.raises(WorkerTaskError, match="ValueError"):
            pool.run(int, [("not a number",)])
        assert pool.run(abs, [(-5,)])[0].value == 5


# --- json / label / format / overlong ----------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
GOLD = {"name": "Ada Lovelace", "age": 36}


@pytest.mark.parametrize(
    "completion, expected",
    [
        ('```json\n{"name": "ada  lovelace", "age": 36}\n```', 1.0),  # strings case/space-folded
        ('Here: {"name": "Ada Lovelace", "age": 35} done', 2 / 3),  # name weight 2, age weight 1
        ('{"name": "Grace", "age": 36}', 1 / 3),
        ('{"name": "Ada Lovelace"}', 0.0),  # schema: age required
        ('{"name": "Ada Lovelace", "age": "36"}', 0.0),  # schema: wrong type
        ('{"name": "Ada Lovelace", "age": 36', 0.0),  # truncated
        ('{"name": "x", "name": "Ada Lovelace", "age": 36}', 0.0),  # duplicate keys
        ('{"name": "Grace", "age": 1} {"name": "Ada Lovelace", "age": 36}', 0.0),  # hedge
        ('{"a": {"name": "Ada Lovelace", "age": 36}, "a": 1}', 0.0),  # gold nested in a broken object
        ("no json here", 0.0),
    ],
)
def test_json_schema_and_weighted_fields(completion, expected):
    v = load("json", schema=SCHEMA, field_weights={"name": 2.0})
    assert v(completion, answer=GOLD) == pytest.approx(expected)


def test_json_gold_as_string_and_schema_only_mode(tmp_path):
    import json

    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    v = load("json", schema=str(path))
    assert v('{"name": "Ada Lovelace", "age": 36}', answer=json.dumps(GOLD)) == 1.0
    # A row without its gold is an error, never "schema-valid, so correct" (issue 22: a renamed gold column
    # made every schema-valid answer score 1.0 and held-out accuracy read 100%).
    with pytest.raises(KeyError, match="no gold value in column 'answer'.*schema_only"):
        v('{"name": "Bob", "age": 1}', gold=json.dumps(GOLD))
    only = load("json", schema=str(path), schema_only=True)  # schema validity alone: asked for explicitly
    assert (
        only('{"name": "Bob", "age": 1}') == 1.0 and only('{"name": "Bob", "age": 1}', answer=json.dumps(GOLD)) == 1.0
    )
    assert only('{"name": "Bob", "age": true}') == 0.0  # bool is not an integer here


def test_label_normalized_match_and_label_set():
    v = load("label", labels=["Positive", "Negative"])
    assert v("  POSITIVE!! ", label="positive") == 1.0
    assert v("<answer>negative</answer>", label="positive") == 0.0
    assert v("<answer>neutral</answer>", label="neutral") == 0.0  # outside the allowed set
    assert v("<answer>positive</answer><answer>negative</answer>", label="positive") == 0.0
    assert v("positive or negative", label="positive") == 0.0
    assert v("<answer>Negative</answer>", label=1) == 1.0  # integer gold indexes `labels`
    assert load("label")("<answer>spam</answer>", answer="SPAM") == 1.0


def test_format_and_regex():
    fmt = load("format")
    assert fmt("<think>because</think>\n<answer>5</answer>\n") == 1.0
    assert fmt("<think></think><answer> 5 </answer>") == 1.0
    assert fmt("<think></think><answer></answer>") == 0.0  # format without content
    assert fmt("<think>x</think><answer>1</answer><answer>2</answer>") == 0.0
    assert fmt("<answer>5</answer>") == 0.0
    assert fmt("preamble <think>x</think><answer>5</answer>") == 0.0
    rx = load("regex", pattern=r"answer: \d+", flags="IGNORECASE", full=False)
    assert rx("so ANSWER: 12 ok") == 1.0 and rx("answer: twelve") == 0.0
    with pytest.raises(TypeError):
        load("regex")  # pattern is required


@pytest.mark.parametrize(
    "length, expected",
    [(0, 0.0), (80, 0.0), (81, -0.025), (90, -0.25), (99, -0.475), (100, -0.5), (101, -0.5), (10_000, -0.5)],
)
def test_overlong_formula_at_the_boundaries(length, expected):
    # L_max=100, L_cache=20, factor 0.5: 0 up to 80 tokens, then (80 - len)/20 * 0.5, then -0.5.
    v = load("overlong", max_completion_length=100, buffer=20, penalty_factor=0.5)
    assert v("text", completion_length=length) == pytest.approx(expected)
    assert soft_overlong_penalty(length, 100, 20, 0.5) == pytest.approx(expected)


def test_overlong_needs_a_length():
    with pytest.raises(KeyError, match="completion_length"):
        load("overlong", max_completion_length=100)("text")


# --- spurious controls --------------------------------------------------------------------------------


def test_random_is_seeded_reproducible_and_has_rate_p():
    a, b, c = (load("random", p=0.3, seed=s) for s in (7, 7, 8))
    draws_a = [a("same completion") for _ in range(4000)]
    draws_b = [b("same completion") for _ in range(4000)]
    draws_c = [c("same completion") for _ in range(4000)]
    assert draws_a == draws_b
    assert draws_a != draws_c
    rate = sum(draws_a) / len(draws_a)
    assert abs(rate - 0.3) < 3 * math.sqrt(0.3 * 0.7 / 4000)
    assert set(draws_a) == {0.0, 1.0}  # identical completions still get independent draws


def test_incorrect_and_format_only():
    with load("incorrect", workers=1) as inc:
        assert inc(r"\boxed{3}", answer="4") == 1.0
        assert inc(r"\boxed{4}", answer="4") == 0.0
        assert inc(r"\boxed{2\sqrt{2}}", answer=r"\sqrt{8}") == 0.0  # correct via math-verify
        assert inc("4", answer="4") == 0.0  # no answer extracted
        assert inc(r"\boxed{3} \boxed{5}", answer="4") == 0.0  # hedged
    fo = load("format_only")
    assert fo(r"\boxed{3}", answer="4") == 1.0
    assert fo(r"\boxed{4}", answer="4") == 1.0
    assert fo("4") == 0.0
    assert fo(r"\boxed{3} or \boxed{4}") == 0.0


# --- composite reward, user functions, TRL form --------------------------------------------------------


def test_build_reward_weights_and_component_names():
    specs = [
        ("math", 1.0, {}),
        ("math", 0.5, {"extract": "answer_tag"}),
        ("format", 0.25, {}),
        ("overlong", 1.0, {"max_completion_length": 100, "buffer": 20}),
    ]
    with build_reward(specs, workers=1) as reward:
        completions = [
            "<think>t</think><answer>4</answer>",
            r"<think>t</think> \boxed{4}",
            "<think>t</think><answer>5</answer>",
        ]
        out = reward(completions, ["2+2?"] * 3, {"answer": ["4", "4", "4"]}, completion_lengths=[10, 90, 100])
    assert list(out.components) == ["math", "math_2", "format", "overlong"]
    assert out.components["math"] == [1.0, 1.0, 0.0]
    assert out.components["math_2"] == [1.0, 0.0, 0.0]
    assert out.components["format"] == [1.0, 0.0, 1.0]
    assert out.components["overlong"] == [0.0, -0.5, -1.0]
    assert out.total == pytest.approx([1.0 + 0.5 + 0.25, 1.0 - 0.5, 0.25 - 1.0])


def test_build_reward_validates_columns():
    reward = build_reward([("format", 1.0, {})])
    with pytest.raises(ValueError, match="column 'answer'"):
        reward(["a", "b"], ["p", "q"], {"answer": ["only one"]})


def test_user_trl_function_drops_in_unchanged():
    reward = build_reward(
        [
            ("reward_fns_example:length_reward", 2.0, {}),
            ("reward_fns_example:contains_keyword", 1.0, {}),
            ("reward_fns_example:skip_odd_rows", 1.0, {}),
        ]
    )
    out = reward(["abc", "hello"], ["p1", "p2"], {"target_len": [3, 4], "keyword": ["b", "hell"]})
    assert list(out.components) == ["length_reward", "contains_keyword", "skip_odd_rows"]
    assert out.components["length_reward"] == [1.0, 0.0]
    assert out.components["contains_keyword"] == [1.0, 1.0]
    assert out.components["skip_odd_rows"][0] == 1.0 and math.isnan(out.components["skip_odd_rows"][1])
    assert out.total == [2.0 + 1.0 + 1.0, 1.0]  # the None (NaN) term is left out of the sum


def test_user_function_exceptions_propagate_with_context():
    reward = build_reward([("reward_fns_example:broken", 1.0, {})])
    with pytest.raises(VerifierError, match="broken.*ZeroDivisionError"):
        reward(["x"], ["p"], {})
    with pytest.raises(VerifierError, match="row 1"):
        build_reward([("reward_fns_example:contains_keyword", 1.0, {})])(
            ["a", "b"], ["p", "q"], {"other": [1, 2], "keyword": ["a", None]}
        )


def test_batch_adapter_has_the_trl_signature():
    fn = batch(load("label"))
    assert fn.__name__ == "label"
    scores = fn(
        ["<answer>cat</answer>", [{"role": "assistant", "content": "dog"}]],
        prompts=["p", "q"],
        label=["cat", "cat"],
        trainer_state=object(),
    )
    assert scores == [1.0, 0.0]


def test_load_errors_and_laziness():
    with pytest.raises(ValueError, match="unknown verifier"):
        load("nope")
    with pytest.raises(ImportError, match="no_such_module"):
        load("no_such_module:fn")
    code = (
        "import sys, posttrain.rewards as v; v.load('format'); "
        "print('math_verify' in sys.modules, 'posttrain.rewards.code' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.stdout.split() == ["False", "False"]


def test_score_is_a_float_with_details():
    s = Score(1.0, "exact", "4")
    assert s == 1.0 and s + 1 == 2.0 and s.reason == "exact"
    import pickle

    t = pickle.loads(pickle.dumps(s))
    assert (float(t), t.reason, t.answer) == (1.0, "exact", "4")


@pytest.mark.parametrize(
    "gold, answer",
    [
        ("7", "7.0"),
        ("7", "8"),
        (r"\frac{3}{7}", r"\frac{6}{14}"),
        (r"\frac{3}{7}", "0.4285714286"),
        ("7", "x=7"),
        ("7", "x=8"),
        ("x=7", "7"),
        (r"\{7,8\}", r"\{8,7\}"),
        (r"\{7,8\}", r"\{7,9\}"),
        (r"\{7,8\}", r"\{7,8,9\}"),
        ("-2", r"-\frac{4}{2}"),
        ("0.5", r"\frac12"),
    ],
)
def test_fast_path_agrees_with_math_verify(gold, answer):
    from posttrain.rewards.extract import fast_equivalence
    from posttrain.rewards.math import check_equivalence

    fast = fast_equivalence(gold, answer, 1e-6)
    assert fast is not None, "this pair should be decided by the fast path"
    assert fast == check_equivalence(gold, answer, 1e-6, 5)[0]  # in-process: this is the main thread


@pytest.mark.parametrize("text", ["\\boxed \n5", "\\boxed $5$", "so \\boxed \t\n", "\\boxed  $"])
def test_a_box_without_an_argument_is_no_answer_not_a_crash(text):
    from posttrain.rewards.extract import find_boxed

    assert all(content.strip() for _, content in find_boxed(text))  # found nothing bogus, raised nothing
    assert float(load("math", workers=1)(text, answer="5")) == 0.0


@pytest.mark.parametrize(
    "completion,mode,expected",
    [
        ("5-0=5,5+3=8 \\boxed{8}", "auto", 1.0),
        ("so $\\boxed{8}$.", "auto", 1.0),
        ("\\[ \\boxed{8} \\]", "auto", 1.0),
        ("<answer>\\boxed{8}</answer>", "auto", 1.0),
        ("<think>maybe \\boxed{3}</think><answer>8</answer>\n", "auto", 1.0),
        ("8+0=8 \\boxed{8} 0}0},4}0}7}", "auto", 0.0),  # what the demo's GRPO policy learned to do
        ("\\boxed{8} and that is final", "auto", 0.0),
        ("<answer>8</answer> trailing", "answer_tag", 0.0),
        ("The answer is 8. Done", "pattern", 0.0),
        ("The answer is 8.", "pattern", 1.0),
    ],
)
def test_math_trailing_reject_scores_text_after_the_final_answer(completion, mode, expected):
    opts = {"pattern": r"answer is (\d+)"} if mode == "pattern" else {"extract": mode}
    strict = MathVerifier(trailing="reject", workers=1, **opts)
    lenient = MathVerifier(workers=1, **opts)
    got = strict(completion, answer="8")
    assert float(got) == expected
    if expected == 0.0:
        assert got.reason == "trailing_text" and got.answer == "8"
    assert float(lenient(completion, answer="8")) == 1.0  # the default still accepts it
    with pytest.raises(ValueError, match="trailing"):
        MathVerifier(trailing="strict")


def test_extraction_keeps_the_text_after_the_final_answer():
    from posttrain.rewards.extract import extract_answers

    assert extract_answers("a \\boxed{1} b \\boxed{\\frac{1}{2}} tail").after == " tail"
    assert extract_answers("no claim here").after is None
    assert extract_answers("\\boxed 5 rest", mode="boxed").after == " rest"


def test_a_rows_own_completion_column_never_clashes_with_the_completion_scored():
    # an SFT row (builtin:clauses) carries its reference completion; a verifier scores the one it is given
    label = load("label", labels=["payment", "prohibition"])
    row = {"prompt": "pay =>", "completion": " payment", "label": "payment"}
    assert score_all(label, [" payment", " prohibition"], [row, row]) == [1.0, 0.0]
