"""What a user sees when something is wrong: one message naming the problem, never a traceback."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.commands.main import main

ROOT = Path(__file__).resolve().parent.parent
SFT = [
    "model=tiny",
    "data.path=builtin:arithmetic",
    "data.num_examples=32",
    "data.max_length=48",
    "train.micro_batch_size=8",
    "train.progress=false",
    "train.steps=1",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    d = tmp_path_factory.mktemp("model")
    tok = build_tokenizer("char")
    build_tiny_model("tiny", tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_an_unexpected_exception_is_a_message_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    from posttrain.recipes import sft

    def bug(*a, **k):
        raise KeyError("boom")

    monkeypatch.setattr(sft, "encode_rows", bug)
    args = ["sft", *SFT, f"train.output_dir={tmp_path / 'r'}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "posttrain sft: error: KeyError: 'boom'" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(KeyError):
        main(["--debug", *args[:1], *args[1:-1], f"train.output_dir={tmp_path / 'r2'}"])
    monkeypatch.setenv("POSTTRAIN_DEBUG", "1")
    with pytest.raises(KeyError):
        main([*args[:-1], f"train.output_dir={tmp_path / 'r3'}"])


def test_an_invalid_config_creates_no_output_directory(tmp_path, capsys):
    out = tmp_path / "never"
    assert (
        main(["grpo", "model=tiny", "data.path=builtin:arithmetic", "rewards=[mathh]", f"train.output_dir={out}"]) == 2
    )
    err = capsys.readouterr().err
    assert "rewards[0].name='mathh': unknown verifier 'mathh'; did you mean 'math'?" in err
    assert not out.exists()


def test_a_read_only_output_directory_is_named(tmp_path, monkeypatch, capsys):
    import errno

    from posttrain.run import rundir

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(rundir, "atomic_write_text", read_only)
    out = tmp_path / "ro"
    assert main(["sft", *SFT, f"train.output_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out / 'config.yaml'}: the file system is read-only (train.output_dir='{out}')" in err


def test_an_output_directory_under_a_file_is_named(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "run"
    assert main(["sft", *SFT, f"train.output_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out}" in err and "a part of that path is a file, not a directory" in err
    assert "Traceback" not in err


def test_the_readme_reward_example_runs_as_written_from_the_working_directory(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = readme.split("# my_rewards.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    # the installed console script, as a user runs it: unlike `python -m`, it does not put the working
    # directory on sys.path
    script = Path(sys.executable).parent / "posttrain"
    out = subprocess.run(
        [
            str(script),
            "grpo",
            "model=tiny",
            "data.path=builtin:arithmetic",
            "data.num_examples=16",
            "prompts_per_step=2",
            "num_generations=2",
            "max_completion_length=4",
            "train.micro_batch_size=4",
            "train.steps=1",
            "train.progress=false",
            "rewards=[{name: 'my_rewards:has_units'}]",
            "train.output_dir=run",
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reward/has_units/mean" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_eval_names_an_unknown_verifier_before_loading_anything(capsys):
    assert main(["eval", "--model", "/nonexistent", "--data", "builtin:arithmetic", "--verifier", "mathh"]) == 1
    err = capsys.readouterr().err
    assert "posttrain eval: error: unknown verifier 'mathh'; did you mean 'math'?" in err


def test_eval_refuses_a_split_for_a_single_file(tmp_path, capsys):
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x", "--data", str(f), "--split", "validation"])
    assert "--split 'validation' cannot apply to the file" in capsys.readouterr().err


def test_maj_at_k_uses_a_user_functions_extractor_or_says_why_it_is_missing(model_dir):
    from posttrain.evaluation import evaluate_model_dir

    kw = dict(split="test", limit=4, num_examples=4, k=2, max_new_tokens=4)
    s = evaluate_model_dir(str(model_dir), "builtin:arithmetic", verifier="extracting_rewards:last_char", **kw)
    assert s.maj_at_k is not None and s.maj_at_k_missing is None
    s = evaluate_model_dir(str(model_dir), "builtin:arithmetic", verifier="toy_rewards:ones", **kw)
    assert s.maj_at_k is None and "'ones' exposes no answer extractor" in s.maj_at_k_missing
    from posttrain.evaluation import format_summary

    assert "maj@2: not computed: verifier 'ones' exposes no answer extractor" in format_summary(s)


def test_threads_are_chosen_logged_and_settable(tmp_path, monkeypatch, caplog):
    from posttrain.recipes import sft
    from posttrain.run.loop import choose_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("POSTTRAIN_THREADS", raising=False)
    n, why = choose_threads(0)
    assert n >= 1 and why.startswith("auto: half of the")
    monkeypatch.setenv("POSTTRAIN_THREADS", "3")
    assert choose_threads(0) == (3, "$POSTTRAIN_THREADS") and choose_threads(2) == (2, "train.threads")
    monkeypatch.setenv("POSTTRAIN_THREADS", "many")
    with pytest.raises(ValueError, match=r"\$POSTTRAIN_THREADS='many'"):
        choose_threads(0)
    monkeypatch.delenv("POSTTRAIN_THREADS")
    from posttrain.config import SFTConfig, config_from_dict

    try:
        with caplog.at_level(logging.INFO, logger="posttrain"):
            sft.train(config_from_dict(SFTConfig, {}, [*SFT, "train.threads=2", f"train.output_dir={tmp_path / 'r'}"]))
        assert torch.get_num_threads() == 2
        assert "CPU threads: 2 (train.threads;" in caplog.text
    finally:
        torch.set_num_threads(1)  # the suite runs single-threaded (conftest)


def test_report_and_metrics_of_a_resumed_run_stay_readable(tmp_path):
    # resumes.jsonl is plain JSON lines a report or a script can read
    from posttrain.config import SFTConfig, config_from_dict
    from posttrain.recipes import sft

    base = [*SFT[:-1], f"train.output_dir={tmp_path / 'r'}"]
    sft.train(config_from_dict(SFTConfig, {}, [*base, "train.steps=1"]))
    sft.train(config_from_dict(SFTConfig, {}, [*base, "train.steps=2"]))
    rec = json.loads((tmp_path / "r" / "resumes.jsonl").read_text())
    assert rec["changed"] == {"train.steps": [1, 2]}
    assert main(["report", str(tmp_path / "r")]) == 0


def test_command_line_counts_and_devices_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", "m", "--data", "builtin:arithmetic", "--limit", "-1"])
    assert "argument --limit: must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["make-pairs", "--model", "m", "--data", "d", "--out", "o", "-n", "1"])
    assert "argument -n: must be >= 2, got 1" in capsys.readouterr().err
    from posttrain.models.loading import ModelError, resolve_device

    with pytest.raises(ModelError, match="model.device='gpu' is not a device"):
        resolve_device("gpu")


def test_the_preflight_resolves_a_verifier_class_without_building_it():
    from extracting_rewards import Costly
    from posttrain.run.preflight import verifier_problem

    assert verifier_problem("extracting_rewards:Costly", {"threshold": 0.9}) is None
    assert "unknown option(s) ['treshold']; its options are ['threshold']" in verifier_problem(
        "extracting_rewards:Costly", {"treshold": 0.9}
    )
    assert Costly.built == 0


def test_a_failed_atomic_write_names_the_file_not_its_temporary(tmp_path, monkeypatch, capsys):
    import errno

    from posttrain.runtime import files as io_utils

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / ".report.html.x1y2.tmp"))

    monkeypatch.setattr(io_utils.tempfile, "mkstemp", full)
    assert main(["report", str(run)]) == 1
    assert f"posttrain report: error: cannot write {run / 'report.html'}: the disk is full" in capsys.readouterr().err


def test_a_run_directory_config_runs_again_as_a_config_of_its_recipe_only(tmp_path, capsys):
    """`posttrain sft RUN/config.yaml optim.lr=...` reruns a recorded run as a variant; the record's
    `recipe` key must match the command."""
    first = tmp_path / "first"
    assert main(["sft", *SFT, f"train.output_dir={first}"]) == 0
    again = tmp_path / "again"
    assert main(["sft", str(first / "config.yaml"), "optim.lr=1e-3", f"train.output_dir={again}"]) == 0
    assert (again / "final").exists()
    capsys.readouterr()
    assert main(["grpo", str(first / "config.yaml"), f"train.output_dir={tmp_path / 'g'}"]) == 2
    err = capsys.readouterr().err
    assert "this is the config of a 'sft' run" in err and "posttrain sft" in err


# --- issue 22's trial: errors a new user met -----------------------------------------------------------------


def test_a_syntax_error_in_a_reward_module_names_its_file_and_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_rewards.py").write_text("def score(completion, **kw):\n    return 1.0 if completion else\n")
    code = main(
        [
            "grpo",
            "model=tiny",
            "data.path=builtin:arithmetic",
            "rewards=[broken_rewards:score]",
            f"train.output_dir={tmp_path / 'r'}",
        ]
    )
    err = capsys.readouterr().err
    assert code in (1, 2) and "broken_rewards.py:2: syntax error" in err and "unexpected" not in err
    assert not (tmp_path / "r").exists()


def test_a_model_directory_without_tokenizer_files_says_exactly_that(tmp_path, capsys, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")  # weights and config, no tokenizer
    code = main(
        ["sft", f"model={tmp_path / 'm'}", "data.path=builtin:arithmetic", f"train.output_dir={tmp_path / 'r'}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no tokenizer files" in err and "sentencepiece" not in err and not (tmp_path / "r").exists()
    from posttrain.models.loading import ModelError, load_tokenizer

    with pytest.raises(ModelError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "m")


def test_a_missing_data_file_names_the_directory_it_was_looked_for_in(tmp_path, monkeypatch, capsys):
    from posttrain.data.io import DataError, read_rows

    monkeypatch.chdir(tmp_path)
    code = main(["sft", "model=tiny", "data.path=data/train.jsonl", f"train.output_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"read from the working directory, {tmp_path}" in err
    with pytest.raises(DataError, match=f"data/train.jsonl: no such file or directory .*{tmp_path}"):
        read_rows("data/train.jsonl", "train")


# --- verifier data contracts, checked before anything starts (issue 22) ------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def _grpo(tmp_path, data, reward):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return [
        "grpo",
        "model=tiny",
        f"data.path={path}",
        f"rewards=[{json.dumps(reward)}]",
        f"train.output_dir={tmp_path / 'run'}",
    ]


def test_a_json_reward_whose_gold_column_is_missing_refuses_to_run_naming_file_row_and_column(tmp_path, capsys):
    rows = [{"prompt": "Ada, 36", "gold": {"name": "Ada", "age": 36}}] * 3  # the gold column renamed
    assert main(_grpo(tmp_path, rows, {"name": "json", "options": {"schema": SCHEMA}})) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:1: no gold value in column 'answer'" in err and "train.jsonl:3:" in err
    assert "schema_only: true" in err and not (tmp_path / "run").exists()


def test_a_gold_value_the_verifier_would_reject_stops_the_run(tmp_path, capsys):
    rows = [
        {"prompt": "Ada", "answer": {"name": "Ada", "age": "36"}},
        {"prompt": "Bo", "answer": {"name": "Bo", "age": 3}},
    ]
    assert main(_grpo(tmp_path, rows, {"name": "json", "options": {"schema": SCHEMA}})) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:1: the gold object fails the schema: '36' is not of type 'integer'" in err
    assert "train.jsonl:2" not in err
    labels = [{"prompt": "clause", "label": "indemnity"}, {"prompt": "clause", "label": "warranty"}]
    assert main(_grpo(tmp_path, labels, {"name": "label", "options": {"labels": ["indemnity", "termination"]}})) == 2
    assert "train.jsonl:2: gold label 'warranty' is not one of options.labels" in capsys.readouterr().err


def test_an_invalid_schema_is_one_line_and_exit_2(tmp_path, capsys):
    rows = [{"prompt": "Ada", "answer": {"name": "Ada", "age": 36}}]
    assert main(_grpo(tmp_path, rows, {"name": "json", "options": {"schema": {"type": "objekt"}}})) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "schema" in x]
    assert "options.schema: not a valid JSON Schema at type" in line and len(err.splitlines()) <= 3


def test_schema_only_is_an_explicit_mode_that_reads_no_gold(tmp_path):
    from posttrain.rewards.registry import data_problems

    rows = [{"prompt": "x"}]
    assert data_problems("json", {"schema": SCHEMA, "schema_only": True}, rows, ["f:1"]) == []
    assert data_problems("json", {"schema": SCHEMA}, rows, ["f:1"])[0].startswith("f:1: no gold value")
    assert data_problems("json", {"schema_only": True}, rows, ["f:1"]) == [
        "options.schema_only: true needs options.schema"
    ]


def test_eval_with_verifier_options_scores_as_the_pipelines_evaluation(tmp_path, model_dir):
    """`posttrain eval --option` / `--options FILE` reach the verifier, and give the scores the pipeline's
    evaluation gives with the same `eval.verifier_options` (a label set could not be evaluated before)."""
    from posttrain.config import config_from_dict
    from posttrain.pipeline.stages import PipelineConfig, evaluate_stage_model

    data = tmp_path / "clauses.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"clause {i}:", "label": ["a", "b"][i % 2]}) + "\n" for i in range(6))
    )
    (tmp_path / "opts.yaml").write_text("labels: [a, b]\nallow_bare: true\n")
    outs = []
    for flags in (["--option", 'labels=["a","b"]'], ["--options", str(tmp_path / "opts.yaml")]):
        out = tmp_path / f"eval{len(outs)}.json"
        args = ["eval", "--model", str(model_dir), "--data", str(data), "--verifier", "label", *flags, "-k", "2"]
        assert main([*args, "--max-new-tokens", "4", "--json", str(out)]) == 0
        outs.append(json.loads(out.read_text()))
    cfg = config_from_dict(
        PipelineConfig,
        {
            "output_dir": str(tmp_path / "p"),
            "stages": [{"name": "s", "recipe": "sft", "config": {}}],
            "eval": {
                "data": str(data),
                "verifier": "label",
                "verifier_options": {"labels": ["a", "b"]},
                "k": 2,
                "max_new_tokens": 4,
                "examples": 0,
            },
        },
    )
    pipeline = evaluate_stage_model(str(model_dir), cfg)
    for o in outs:
        assert o["greedy_accuracy"] == pipeline["greedy_accuracy"] and o["samples"] == pipeline["samples"]
        assert o["majority_baseline"] == pipeline["majority_baseline"] == 0.5
    assert (
        main(["eval", "--model", str(model_dir), "--data", str(data), "--verifier", "label", "--option", "labelz=1"])
        == 1
    )
