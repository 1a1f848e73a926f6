"""The code verifier's answer: a program's output signature on its row's tests (issue 22). Equal outputs are
one answer however the programs are written, so maj@k votes over what programs do, and the diversity metrics
and the collapse warning count it; a text-only extractor goes through the same batched reader."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from posttrain.config import DiagnosticsConfig
from posttrain.evaluation import evaluate
from posttrain.report.html import eval_comparison
from posttrain.rewards.code import CodeVerifier
from posttrain.rewards.registry import answer_reader
from posttrain.rl.diagnostics import Monitor
from posttrain.rl.groups import Group
from posttrain.rl.watch import RunWatch


@pytest.fixture(scope="module")
def verifier() -> CodeVerifier:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed (make system-deps)")
    return CodeVerifier(timeout=2.0)


def fenced(code: str) -> str:
    return f"My solution:\n```python\n{code}\n```"


ADD = {
    "prompt": "Print the sum of the two numbers.",
    "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}],
}
MUL = {
    "prompt": "Print their product.",
    "tests": [{"input": "2 3\n", "output": "6\n"}, {"input": "4 5\n", "output": "20\n"}],
}

ADD_A = fenced("a, b = map(int, input().split())\nprint(a + b)")
ADD_B = fenced(
    "import sys\n\nnums = [int(t) for t in sys.stdin.read().split()]\nsys.stdout.write(f'{sum(nums)}  \\n\\n')"
)
SUB = fenced("a, b = map(int, input().split())\nprint(a - b)")
MUL_A = fenced("a, b = map(int, input().split())\nprint(a * b)")
MUL_B = fenced("import math\nprint(math.prod(int(t) for t in input().split()))")
CONSTANT = fenced("print(6)")


def test_programs_written_differently_that_output_the_same_share_one_signature(verifier):
    texts = [ADD_A, ADD_B, SUB, fenced("raise SystemExit(3)"), "I cannot write this program."]
    right_a, right_b, wrong, crashed, prose = verifier.extract_row_answers(texts, [ADD] * len(texts))
    # trailing spaces and blank lines are not output, as the comparison reads it
    assert right_a == right_b == verifier.gold_answer(ADD) == '["3","6"]'
    assert wrong == '["-1","14"]'
    assert crashed is None and prose is None  # no case ran to the end: no answer (not one shared "answer")
    assert verifier.gold_answer({"prompt": "no tests"}) is None


def test_call_signatures_read_values_as_the_comparison_does(verifier):
    row = {"tests": {"fn_name": "pair", "inputs": [[2], [3]], "outputs": [[2, 4], [3, 9]]}}
    texts = [
        fenced("def pair(x):\n    return [x, x * x]"),
        fenced("pair = lambda x: (x, x ** 2)"),  # a tuple passes for a JSON list, and signs alike
        fenced("class Solution:\n    def pair(self, x):\n        return [x, pow(x, 2)]"),
        fenced("def pair(x):\n    return [x, x * x * 1.0]"),  # 4.0 is not 4: fails, and signs apart
        fenced("def pair(x):\n    return [x, x + x]"),
    ]
    scores = verifier.score_batch(texts, [row] * len(texts))
    assert [float(s) for s in scores] == [1.0, 1.0, 1.0, 0.0, 0.0]
    a, b, c, floats, wrong = verifier.extract_row_answers(texts, [row] * len(texts))
    assert a == b == c == verifier.gold_answer(row) == "[[2,4],[3,9]]"
    assert floats == "[[2,4.0],[3,9.0]]" and wrong == "[[2,4],[3,6]]"


def test_answers_of_programs_just_scored_are_read_without_running_them_again():
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed (make system-deps)")
    v = CodeVerifier(timeout=2.0)
    runs = []
    run = v.sandbox.run
    v.sandbox.run = lambda job, timeout: runs.append(job["fail_fast"]) or run(job, timeout)
    first_fails = fenced("a, b = map(int, input().split())\nif a == 1:\n    raise SystemExit(1)\nprint(a + b)")
    v.score_batch([ADD_A, SUB, first_fails], [ADD] * 3)
    assert runs == [True, True, True]
    answers = v.extract_row_answers([ADD_A, SUB, first_fails], [ADD] * 3)
    # the fail-fast run of the last program skipped its second case: only that one runs again, every case
    assert runs == [True, True, True, False]
    assert answers == ['["3","6"]', '["-1","14"]', '[{"failed":"exited"},"6"]']


class _Scripted:
    """A rollout engine that answers each prompt with scripted texts: greedy the first, samples in turn."""

    def __init__(self, tok, texts_by_prompt):
        self.tok, self.texts = tok, texts_by_prompt

    def generate(self, prompts, n, params):
        from posttrain.rollout.engine import Generation

        outs = [self.texts[i][0 if params.temperature == 0 else 1 + j] for i in range(len(prompts)) for j in range(n)]
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in outs]
        return Generation(prompts, ids, [False] * len(ids), None)


def test_maj_at_k_votes_over_what_the_programs_output(verifier, char_tok):
    texts = [
        # each prompt: three different texts, so a vote over texts ties and takes the first sample (wrong);
        # over outputs, the two right programs (written differently) agree and outvote it
        [ADD_A, SUB, ADD_A.replace("a, b", "x, y").replace("a + b", "x + y"), ADD_B],
        [ADD_A, ADD_A, MUL_A, MUL_B],
    ]
    s = evaluate(None, char_tok, [ADD, MUL], verifier, k=3, engine=_Scripted(char_tok, texts))
    assert s.greedy_accuracy == 0.5
    assert s.pass_at_k == 1.0 and s.mean_at_k == pytest.approx(2 / 3)
    assert s.maj_at_k == 1.0 and s.maj_at_k_missing is None
    # the report's expected / got: what the tests expect, what the greedy program printed
    assert [(x["expected"], x["got"]) for x in s.samples] == [('["3","6"]', '["3","6"]'), ('["6","20"]', '["5","9"]')]
    html = eval_comparison({"samples": s.samples}, "before", {"samples": s.samples}, "after")
    assert html.count("got: [&quot;5&quot;,&quot;9&quot;]") == 2 and "expected: [&quot;6&quot;,&quot;20&quot;]" in html


def _group(row: int, texts: list[str], rewards: list[float]) -> Group:
    G = len(texts)
    return Group(
        row, (5,), tuple((6,) for _ in texts), tuple(texts), (False,) * G, tuple(rewards), {"code": tuple(rewards)}
    )


def test_diversity_and_collapse_count_program_outputs(verifier, tmp_path):
    cfg = SimpleNamespace(diagnostics=DiagnosticsConfig(collapse_steps=1))
    watch = RunWatch(tmp_path, cfg, [ADD, MUL], writes=False, reader=answer_reader(verifier))
    groups = [
        _group(0, [ADD_A, ADD_B, SUB, "no program here"], [1.0, 1.0, 0.0, 0.0]),
        _group(1, [MUL_A, MUL_B, MUL_A, ADD_A], [1.0, 1.0, 1.0, 0.0]),
    ]
    m = watch.metrics(groups)
    assert m["diversity/group_distinct"] == 2.0  # add: right (two spellings), wrong; multiply: right, wrong
    assert m["diversity/batch_distinct"] == 2.0  # four signatures over two prompts
    assert m["diversity/top_share"] == pytest.approx(3 / 7)  # the product's outputs: 3 of the 7 answered
    assert m["diversity/no_answer"] == pytest.approx(1 / 8)
    assert m["diversity/gold_top_share"] == 0.5
    assert Monitor(cfg.diagnostics).observe(1, m) == []
    # a policy that prints 6 whatever the input: one answer across prompts whose gold outputs differ
    m = watch.metrics([_group(p, [CONSTANT] * 4, [0.0] * 4) for p in range(2)])
    assert m["diversity/top_share"] == 1.0 and m["diversity/no_answer"] == 0.0
    assert [a.kind for a in Monitor(cfg.diagnostics).observe(1, m)] == ["collapse"]


def test_a_text_only_extractor_is_read_through_the_same_batched_reader():
    from posttrain.rewards import load

    answers, gold = answer_reader(load("label", labels=["yes", "no"]))
    assert answers(["Yes.", "<answer>no</answer>", "maybe"], [{}, {}, {}]) == ["yes", "no", "maybe"]
    assert gold({"label": "No"}) == "no"
    assert answer_reader(lambda text, **row: 1.0).answers is None  # no extractor: maj@k says so
