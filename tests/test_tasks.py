"""Built-in tasks: worked solutions are right, splits are disjoint, the gold completion verifies."""

import pytest

from posttrain.data.io import DataError, read_rows
from posttrain.rewards import load
from posttrain.tasks import get_task


def test_counting_tally_and_answer_are_right():
    rows = get_task("counting", min_len=2, max_len=8).rows(300)
    for r in rows:
        text, target = r["prompt"].rstrip("=").split(":")
        steps, box = r["completion"].split(" ")
        tally = steps.split(",")
        assert [t[0] for t in tally] == list(text)
        assert [int(t[1:]) for t in tally] == [text[: i + 1].count(target) for i in range(len(text))]
        assert r["answer"] == str(text.count(target)) and box == f"\\boxed{{{r['answer']}}}"
    assert {len(r["prompt"].split(":")[0]) for r in rows} == set(range(2, 9))


def test_counting_splits_are_disjoint_and_pretraining_never_sees_a_test_prompt():
    task = get_task("counting", max_len=6)
    train = {r["prompt"] for r in task.rows(2000, "train")}
    test = {r["prompt"] for r in task.rows(200, "test")}
    pre = {r["text"].split("=")[0] + "=" for r in task.pretrain_text(3000)}
    assert not train & test and not pre & test
    assert task.rows(5, "train", seed=1) != task.rows(5, "train", seed=2)  # the seed draws other rows


def test_counting_gold_completions_verify_and_options_come_from_the_path():
    rows = read_rows("builtin:counting?max_len=4&letters=2", "train", num_examples=20).rows
    assert all(set(r["prompt"].split(":")[0]) <= {"a", "b"} for r in rows)
    math = load("math", trailing="reject")
    assert all(math(r["completion"], answer=r["answer"]) == 1.0 for r in rows)
    assert math("a1,a2 \\boxed{3}", answer="2") == 0.0
    with pytest.raises(DataError, match="distinct"):
        read_rows("builtin:counting?max_len=2&letters=1", "train", num_examples=50)
    with pytest.raises(ValueError, match="letters"):
        get_task("counting", letters=0)


@pytest.mark.parametrize("name,short,options", [("arithmetic", 3, {"max_terms": 5}), ("counting", 5, {"max_len": 8})])
def test_long_rows_is_an_exact_count_for_every_seed(name, short, options):
    def size(r):  # terms of an expression / letters of a string
        p = r["prompt"].rstrip("=")
        return p.count("+") + p.count("-") + 1 if name == "arithmetic" else len(p.split(":")[0])

    for seed in range(4):
        rows = get_task(name, long_rows=4, **options).rows(1500, seed=seed)
        long = [i for i, r in enumerate(rows) if size(r) > short]
        assert long == [187, 562, 937, 1312]  # evenly spread, whatever the seed
        assert {size(rows[i]) for i in range(len(rows)) if i not in long} <= set(range(2, short + 1))
    assert all(size(r) <= short for r in get_task(name, long_rows=0, **options).rows(200))
