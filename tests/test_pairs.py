"""make-pairs: sampled completions scored by a verifier become preference pairs / KTO rows that the
verifier agrees with, keep the dataset's columns, and train the preference recipe."""

import json

import pytest

from posttrain.commands.main import main
from posttrain.config import PreferenceConfig, config_from_dict
from posttrain.data.formats import reward_columns
from posttrain.models.tiny import build_tiny_model, build_tokenizer
from posttrain.pipeline.pairs import make_pairs
from posttrain.recipes import preference
from posttrain.rewards import load as load_verifier
from posttrain.runtime.tracking import read_metrics
from posttrain.tasks import get_task

VERIFIER = "toy_rewards:parity"  # deterministic, ~half of a random model's samples pass, reads `answer`


@pytest.fixture(scope="module")
def model_and_tok():
    tok = build_tokenizer("char")
    return build_tiny_model("tiny", tok, seed=0), tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model_and_tok):
    d = tmp_path_factory.mktemp("model")
    model, tok = model_and_tok
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _score(verifier, text, row):
    return float(verifier(text, **reward_columns(row)))


def test_pairs_agree_with_the_verifier_and_keep_columns(model_and_tok):
    model, tok = model_and_tok
    rows = get_task("arithmetic").rows(12)
    verifier = load_verifier(VERIFIER)
    out, stats = make_pairs(model, tok, rows, verifier, 4, max_new_tokens=6, seed=0)
    assert stats.prompts == 12 and stats.completions == 48
    assert stats.pairs == len(out) > 0
    # One pair per prompt unless every sample agreed.
    assert stats.pairs + stats.skipped_all_correct + stats.skipped_all_wrong == 12
    by_prompt = {r["prompt"]: r for r in rows}
    for r in out:
        src = by_prompt[r["prompt"]]
        assert r["answer"] == src["answer"] and "completion" not in r
        assert _score(verifier, r["chosen"], src) == 1.0
        assert _score(verifier, r["rejected"], src) == 0.0
    # The same seed reproduces the same file.
    again, _ = make_pairs(model, tok, rows, verifier, 4, max_new_tokens=6, seed=0)
    assert again == out


def test_pairs_per_prompt_gives_distinct_pairs(model_and_tok):
    model, tok = model_and_tok
    rows = get_task("arithmetic").rows(6)
    out, stats = make_pairs(model, tok, rows, load_verifier(VERIFIER), 8, max_new_tokens=6, pairs_per_prompt=3)
    assert stats.pairs == len(out) > stats.prompts - stats.skipped_all_correct - stats.skipped_all_wrong
    for p in {r["prompt"] for r in out}:
        mine = [(r["chosen"], r["rejected"]) for r in out if r["prompt"] == p]
        assert 1 <= len(mine) <= 3 and len(set(mine)) == len(mine)


def test_conversational_prompts_get_assistant_messages(model_and_tok):
    model, tok = model_and_tok
    rows = [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
        for r in get_task("arithmetic").rows(6)
    ]
    out, _ = make_pairs(model, tok, rows, load_verifier(VERIFIER), 6, max_new_tokens=6)
    assert out
    for r in out:
        assert r["chosen"][0]["role"] == "assistant" and isinstance(r["chosen"][0]["content"], str)


def test_cli_kto_rows_labelled_by_the_verifier(tmp_path, model_dir, capsys):
    out = tmp_path / "kto.jsonl"
    code = main(
        [
            "make-pairs",
            "--model",
            str(model_dir),
            "--data",
            "builtin:arithmetic",
            "--num-examples",
            "10",
            "--verifier",
            VERIFIER,
            "-n",
            "4",
            "--max-new-tokens",
            "6",
            "--kto",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "prompts: 10" in printed and "kto rows:" in printed
    lines = out.read_text().splitlines()
    rows = [json.loads(ln) for ln in lines]  # every line is valid json
    verifier = load_verifier(VERIFIER)
    assert {"prompt", "completion", "label", "answer"} <= set(rows[0])
    assert {r["label"] for r in rows} == {True, False}
    for r in rows:
        assert r["label"] == (_score(verifier, r["completion"], r) == 1.0)


def test_cli_pairs_train_the_preference_recipe(tmp_path, model_dir, capsys):
    out = tmp_path / "pairs.jsonl"
    code = main(
        [
            "make-pairs",
            "--model",
            str(model_dir),
            "--data",
            "builtin:arithmetic",
            "--num-examples",
            "16",
            "--verifier",
            VERIFIER,
            "-n",
            "4",
            "--max-new-tokens",
            "6",
            "--out",
            str(out),
            "--seed",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    n_pairs = len(out.read_text().splitlines())
    assert f"pairs: {n_pairs}" in printed and "every sample wrong" in printed
    cfg = config_from_dict(
        PreferenceConfig,
        {},
        [
            f"model={model_dir}",
            f"data.path={out}",
            "data.eval_fraction=0",
            "train.micro_batch_size=4",
            "train.steps=2",
            "optim.lr=1e-3",
            "train.progress=false",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    preference.train(cfg)
    m = read_metrics(tmp_path / "run")
    assert len(m) == 2 and m[0]["rewards/margin"] == 0.0 and m[1]["rewards/margin"] != 0.0


def test_gold_column_pairs_the_reference_solution_with_the_model_s_wrong_samples(model_and_tok):
    """A random model solves nothing: on-policy pairing skips every prompt; with the rows' worked solutions
    (gold_column) each prompt pairs its solution, if the verifier accepts it, against the model's samples."""
    model, tok = model_and_tok
    rows = get_task("arithmetic").rows(8)
    rows[0] = {**rows[0], "completion": "1+1=3 \\boxed{12345}"}  # a wrong reference is never used
    verifier = load_verifier("math")
    try:
        plain, plain_stats = make_pairs(model, tok, rows, verifier, 4, max_new_tokens=6, seed=0)
        assert plain == [] and plain_stats.skipped_all_wrong == 8 and plain_stats.gold_chosen == 0
        out, stats = make_pairs(
            model, tok, rows, verifier, 4, max_new_tokens=6, seed=0, pairs_per_prompt=2, gold_column="completion"
        )
    finally:
        verifier.close()
    assert stats.gold_chosen == 7 and stats.skipped_all_wrong == 8  # the counts describe the samples
    by_prompt = {r["prompt"]: r for r in rows}
    assert rows[0]["prompt"] not in {r["prompt"] for r in out}
    assert {r["prompt"] for r in out} == {r["prompt"] for r in rows[1:]}
    for r in out:
        assert r["chosen"] == by_prompt[r["prompt"]]["completion"] and r["rejected"] != r["chosen"]
        assert "completion" not in r and r["answer"] == by_prompt[r["prompt"]]["answer"]
