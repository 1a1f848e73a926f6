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


def test_clause_labels_follow_the_verb_unless_the_modal_is_negated():
    from posttrain.tasks.clauses import VERBS

    rows = get_task("clauses").rows(400, split="train", seed=0)
    kinds = {verb: kind for kind, verbs in VERBS.items() for verb in verbs}
    for r in rows:
        words = r["prompt"].split()
        verb = next(w for w in words if w in kinds)
        expected = "prohibition" if " not " in r["prompt"] else kinds[verb]
        assert r["label"] == expected == r["completion"].strip(), r
    assert {r["label"] for r in rows} == {"termination", "confidentiality", "assignment", "payment", "prohibition"}


def test_clause_sft_rows_negate_only_the_first_kinds_while_rl_and_test_rows_negate_all():
    from posttrain.tasks.clauses import VERBS

    first_two = {v for kind in list(VERBS)[:2] for v in VERBS[kind]}
    sft = read_rows("builtin:clauses?negated_in_sft=2", "train", num_examples=500).rows
    negated = [r for r in sft if " not " in r["prompt"]]
    assert negated and all(any(f" {v} " in r["prompt"] for v in first_two) for r in negated)
    for split in ("train", "test"):
        rows = read_rows("builtin:clauses", split, num_examples=300).rows
        assert any(" not " in r["prompt"] and not any(f" {v} " in r["prompt"] for v in first_two) for r in rows)
    test = {r["prompt"] for r in read_rows("builtin:clauses", "test", num_examples=200).rows}
    assert not test & {r["prompt"] for r in sft}
    pre = {r["text"] + " =>" for r in read_rows("builtin:clauses/pretrain", "train", num_examples=2000).rows}
    assert not test & pre


def test_clause_gold_completions_verify_with_the_label_set():
    from posttrain.pipeline.evidence import TASK_REWARDS

    r = TASK_REWARDS["clauses"]
    v = load(r.verifier, **r.options)
    for r in get_task("clauses").rows(50, split="test"):
        assert v(r["completion"], label=r["label"]) == 1.0
        assert v(" termination", label=r["label"]) == float(r["label"] == "termination")


def test_the_clauses_demo_checks_with_the_label_verifier_everywhere():
    from posttrain.commands.demo import demo_config
    from posttrain.config import config_from_dict
    from posttrain.pipeline.evidence import use_task
    from posttrain.pipeline.stages import PipelineConfig, plan

    cfg = config_from_dict(PipelineConfig, use_task(demo_config(False, "runs/x"), "clauses"))
    assert cfg.eval.verifier == "label" and cfg.eval.verifier_options["labels"][-1] == "prohibition"
    plans = {p.name: p for p in plan(cfg)}
    assert [(r.name, r.options["labels"][0]) for r in plans["grpo"].cfg.rewards] == [("label", "termination")]
    assert plans["dpo"].pairs.verifier == "label" and plans["sft"].cfg.data.path == "builtin:clauses?negated_in_sft=2"


def test_extraction_gold_completions_verify_with_the_schema_and_each_field_counts():
    import json

    from posttrain.pipeline.evidence import TASK_REWARDS

    r = TASK_REWARDS["extraction"]
    v, budget = load(r.verifier, **r.options), r.answer_tokens
    rows = get_task("extraction").rows(40, split="test")
    for r in rows:
        assert v(r["completion"], answer=r["answer"]) == 1.0
        wrong = {**r["answer"], "date": "1999-01-01"}
        assert v(" " + json.dumps(wrong), answer=r["answer"]) == 0.75  # three of four fields
    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer("char")
    assert max(len(tok(r["completion"])["input_ids"]) for r in rows) < budget


def test_extraction_sft_rows_show_only_the_first_months_and_pretraining_pairs_every_month_with_its_number():
    from posttrain.tasks.extraction import MONTHS

    sft = read_rows("builtin:extraction?months_in_sft=6", "train", num_examples=300).rows
    assert {int(r["answer"]["date"][5:7]) for r in sft} == set(range(1, 7))
    rl = read_rows("builtin:extraction", "train", num_examples=300).rows
    assert {int(r["answer"]["date"][5:7]) for r in rl} == set(range(1, 13))
    pre = read_rows("builtin:extraction/pretrain", "train", num_examples=600).rows
    assert all(f"{m} " in " ".join(r["text"] for r in pre) for m in MONTHS)
    assert all(f"-{k:02d}-" in " ".join(r["text"] for r in pre) for k in range(1, 13))  # every month's number
    test = {r["prompt"] for r in read_rows("builtin:extraction", "test", num_examples=200).rows}
    assert not test & {r["prompt"] for r in sft} and not test & {r["text"].split(". ")[0] + ". =>" for r in pre}
