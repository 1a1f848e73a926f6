"""A run directory holds one run: resume refuses what would mix or misrecord runs, before writing anything."""

import json

import pytest
import torch
import yaml

from posttrain.commands.main import main
from posttrain.config import GRPOConfig, SFTConfig, config_from_dict, to_dict
from posttrain.models import checkpoint as ck
from posttrain.recipes import sft
from posttrain.run.rundir import RunDirError, check_run_dir, config_diff, is_safe
from posttrain.runtime.tracking import read_metrics

SFT = [
    "model=tiny",
    "data.path=builtin:arithmetic",
    "data.num_examples=64",
    "data.max_length=48",
    "optim.lr=3e-3",
    "train.micro_batch_size=8",
    "train.progress=false",
]


def _sft(run, *overrides):
    return config_from_dict(SFTConfig, {}, [*SFT, f"train.output_dir={run}", *overrides])


def _fake_run(run, cfg, recipe="sft", steps=(4,)):
    """A run directory as a recipe leaves it: config.yaml and complete checkpoints (no weights needed to
    decide what may resume)."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": recipe, **to_dict(cfg)}, sort_keys=False))
    (run / "metrics.jsonl").write_text("")
    for s in steps:
        d = run / "checkpoints" / f"step-{s:08d}"
        d.mkdir(parents=True)
        (d / ck.MARKER).write_text("ok\n")
        (d / ck.STATE_FILE).write_bytes(b"")


def _snapshot(run):
    return {str(p.relative_to(run)): p.read_bytes() if p.is_file() else None for p in sorted(run.rglob("*"))}


def test_a_changed_experiment_field_refuses_resume_with_the_diff(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _sft(run, "train.steps=4"))
    before = _snapshot(run)
    with pytest.raises(RunDirError) as e:
        check_run_dir(_sft(run, "train.steps=4", "optim.lr=0.5"), "sft")
    msg = str(e.value)
    assert "optim.lr: 0.003 -> 0.5" in msg and "fields that change the experiment" in msg
    assert "train.output_dir to a new directory" in msg and "train.resume=" in msg
    # the same through the CLI: the message, exit 1, and the directory untouched
    assert main(["sft", *SFT, f"train.output_dir={run}", "train.steps=4", "optim.lr=0.5", "data.shuffle=false"]) == 1
    assert _snapshot(run) == before


def test_safe_changes_resume_and_are_recorded(tmp_path):
    run = tmp_path / "run"
    sft.train(_sft(run, "train.steps=2"))
    sft.train(_sft(run, "train.steps=4", "train.log_every=3", "train.keep_checkpoints=3"))  # resumes at step 2
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    (record,) = [json.loads(x) for x in (run / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["changed"] == {
        "train.steps": [2, 4],
        "train.log_every": [1, 3],
        "train.keep_checkpoints": [2, 3],
    }
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 4 and saved["train"]["log_every"] == 3


def test_field_safety_is_by_name_for_every_recipe():
    assert is_safe("train.progress") and is_safe("train.report_to[0]") and is_safe("eval_every")
    assert not is_safe("optim.lr") and not is_safe("rewards[0].name") and not is_safe("data.path")
    assert not is_safe("some_field_a_new_recipe_adds")
    a = config_from_dict(GRPOConfig, {})
    saved = {"recipe": "grpo", **to_dict(a)}
    del saved["reward_workers"]  # a config.yaml written before a field existed: its default applies
    assert config_diff(saved, a) == {}
    b = config_from_dict(GRPOConfig, {}, ["rewards=[math, format]"])
    assert config_diff(saved, b) == {
        "rewards[1].name": ("(absent)", "format"),
        "rewards[1].options": ("(absent)", {}),
        "rewards[1].weight": ("(absent)", 1.0),
    }


def test_resume_never_refuses_a_directory_that_holds_a_run(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _sft(run, "train.steps=4"))
    before = _snapshot(run)
    with pytest.raises(
        RunDirError,
        match=r"train.resume=never, but .* already holds a run \(config.yaml, "
        r"metrics.jsonl, checkpoints\).*Nothing was changed",
    ):
        sft.train(_sft(run, "train.steps=2", "train.resume=never"))
    assert _snapshot(run) == before
    # an empty directory (made by the user beforehand) is fine
    (tmp_path / "empty").mkdir()
    assert check_run_dir(_sft(tmp_path / "empty", "train.resume=never"), "sft").resume_from is None


def test_another_recipes_directory_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _sft(run, "train.steps=4"))
    before = _snapshot(run)
    grpo = config_from_dict(
        GRPOConfig, {}, [f"train.output_dir={run}", "train.steps=1", "data.path=builtin:arithmetic"]
    )
    from posttrain.recipes import grpo as grpo_recipe

    with pytest.raises(RunDirError, match=r"holds a run of recipe .sft. .* a grpo run needs a directory of its own"):
        grpo_recipe.train(grpo)
    assert _snapshot(run) == before


def test_steps_below_the_checkpoint_are_refused(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _sft(run, "train.steps=4"))
    with pytest.raises(RunDirError, match=r"train.steps=1, but the checkpoint to resume .* is at step 4"):
        check_run_dir(_sft(run, "train.steps=1"), "sft")
    assert check_run_dir(_sft(run, "train.steps=4"), "sft").resume_step == 4  # equal: the run is complete


def test_branching_from_a_checkpoint_into_a_new_directory_records_the_changes(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _sft(run, "train.steps=4"))
    step = run / "checkpoints" / "step-00000004"
    plan = check_run_dir(_sft(tmp_path / "branch", "train.steps=8", "optim.lr=0.5", f"train.resume={step}"), "sft")
    assert plan.resume_from == step and plan.changes["optim.lr"] == (0.003, 0.5)
    # but not into a directory that holds another run
    _fake_run(tmp_path / "other", _sft(tmp_path / "other", "train.steps=4"))
    with pytest.raises(RunDirError, match="another run's checkpoint"):
        check_run_dir(_sft(tmp_path / "other", "train.steps=8", f"train.resume={step}"), "sft")


def test_a_run_that_never_reached_a_checkpoint_is_replaced(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _sft(run, "train.steps=4"), steps=())
    plan = check_run_dir(_sft(run, "train.steps=4", "optim.lr=0.5"), "sft")
    assert plan.resume_from is None and "metrics.jsonl" in plan.replaces


def test_an_interrupted_prune_leaves_nothing_behind(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = ck.shutil.rmtree
    calls = []

    def killed_mid_delete(path, *a, **k):
        # the process dies while deleting an old checkpoint: some of its files are gone, not all
        if (ck.Path(path) / ck.STATE_FILE).exists() and not calls:
            calls.append(path)
            (ck.Path(path) / ck.STATE_FILE).unlink()
            raise KeyboardInterrupt("killed mid-prune")
        return real(path, *a, **k)

    monkeypatch.setattr(ck.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        sft.train(_sft(run, "train.steps=2", "train.save_every=1", "train.keep_checkpoints=1"))
    monkeypatch.setattr(ck.shutil, "rmtree", real)
    sft.train(_sft(run, "train.steps=4", "train.save_every=1", "train.keep_checkpoints=1"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]


def test_a_full_disk_during_a_checkpoint_is_named_and_leaves_no_partial_directory(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"

    def full(*a, **k):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
            "data/0: file write failed; No space left on device"
        )

    monkeypatch.setattr(torch, "save", full)
    assert main(["sft", *SFT, f"train.output_dir={run}", "train.steps=1"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {run / 'checkpoints'}: the disk is full" in err and "Traceback" not in err
    assert list((run / "checkpoints").iterdir()) == []
