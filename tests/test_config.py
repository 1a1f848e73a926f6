import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from posttrain.config import (RECIPE_CONFIGS, ConfigError, SFTConfig, config_from_dict, field_help, load_config,
                              to_dict)

EXAMPLES = sorted(Path(__file__).resolve().parent.parent.joinpath("examples").glob("*.yaml"))


def test_yaml_plus_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: tiny\noptim:\n  lr: 1.0e-3\ntrain:\n  steps: 5\n")
    cfg = load_config(SFTConfig, p, ["optim.lr=3e-4", "data.path=train.jsonl", "train.report_to=[tensorboard]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 5
    assert cfg.data.path == "train.jsonl"
    assert cfg.train.report_to == ("tensorboard",)
    # Fields the file did not mention keep the recipe's own defaults.
    assert cfg.optim.warmup_steps == SFTConfig().optim.warmup_steps
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


def test_model_shorthand_and_mapping_agree():
    a = config_from_dict(SFTConfig, {"model": "/some/dir"})
    b = config_from_dict(SFTConfig, {"model": {"path": "/some/dir"}})
    assert a == b and a.model.path == "/some/dir"


def test_unknown_key_names_it_and_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; did you mean 'optim.lr'"):
        config_from_dict(SFTConfig, {}, ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train'"):
        config_from_dict(SFTConfig, {"trian": {"steps": 3}})


def test_wrong_type_names_field_value_and_type():
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got 'ten' \(str\)"):
        config_from_dict(SFTConfig, {"train": {"steps": "ten"}})
    with pytest.raises(ConfigError, match=r"model.dtype: 'bf16' is not one of .*did you mean 'bfloat16'"):
        config_from_dict(SFTConfig, {"model": {"dtype": "bf16"}})
    with pytest.raises(ConfigError, match=r"train.steps: must be > 0"):
        config_from_dict(SFTConfig, {}, ["train.steps=0"])


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim: {lr: [1, 2}\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(SFTConfig, p)
    p.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optim.lrr'"):
        load_config(SFTConfig, p)


def test_help_lists_every_leaf_field_with_default_and_doc():
    rows = field_help(SFTConfig)
    names = {r[0] for r in rows}
    assert {"optim.lr", "train.grad_accum", "data.max_length", "lora.r", "packing"} <= names
    lr = next(r for r in rows if r[0] == "optim.lr")
    assert lr[2] == repr(SFTConfig().optim.lr) and lr[3]
    assert all(r[3] for r in rows), [r[0] for r in rows if not r[3]]


def test_resolved_config_round_trips_through_yaml():
    cfg = config_from_dict(SFTConfig, {"model": "tiny"}, ["optim.betas=[0.9, 0.95]"])
    again = config_from_dict(SFTConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


def test_config_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, posttrain.config; assert 'torch' not in sys.modules, 'config imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_loads(path):
    data = yaml.safe_load(path.read_text())
    recipe = data.pop("recipe", None) or path.name.split("_")[0]
    if recipe == "pipeline":
        pytest.skip("pipeline configs are loaded by the pipeline tests")
    assert recipe in RECIPE_CONFIGS, f"{path.name}: cannot tell its recipe"
    config_from_dict(RECIPE_CONFIGS[recipe], data)


def test_an_override_under_a_shorthand_record_keeps_the_shorthand_value():
    from posttrain.config import PPOConfig

    cfg = config_from_dict(PPOConfig, {"critic": "reward_model", "rewards": [{"name": "reward_model"}]},
                           ["critic.lr=3e-4", "model=tiny", "model.dtype=bfloat16"])
    assert (cfg.critic.init, cfg.critic.lr, cfg.model.path, cfg.model.dtype) == ("reward_model", 3e-4, "tiny", "bfloat16")


@pytest.mark.parametrize("override, message", [
    ("data.eval_fraction=3", r"data.eval_fraction: must be in \[0, 1\), got 3.0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints: must be >= 0, got -1"),
    ("train.seed=-1", r"train.seed: must be in \[0, 4294967295\], got -1"),
    ("optim.betas=[0.9, 1.5]", r"optim.betas\[1\]: must be in \[0, 1\), got 1.5"),
    ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
    ("optim.eps=0", "optim.eps: must be > 0"),
    ("lora.dropout=1", r"lora.dropout: must be in \[0, 1\)"),
    ("train.report_to=[tensorbord]", r"train.report_to\[0\]: unknown sink 'tensorbord'"),
    ("data.split=validation", "data.split: 'validation' cannot apply to the file 'train.jsonl'"),
    ("train.output_dir=", "train.output_dir: empty"),
])
def test_every_range_is_checked_at_load_time_naming_the_override(override, message):
    with pytest.raises(ConfigError, match=f"override '{re.escape(override)}': {message}"):
        load_config(SFTConfig, None, ["data.path=train.jsonl", override])


def test_grpo_ranges_and_the_reward_list_are_checked_at_load_time():
    from posttrain.config import GRPOConfig

    for override, message in [("top_p=2", r"top_p: must be in \(0, 1\]"),
                              ("rewards=[{name: math, weight: .nan}]", r"rewards\[0\].weight: must be a finite"),
                              ("max_completion_length=300", "data.max_length: 256 leaves no room for a prompt")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(GRPOConfig, {}, [override])


def test_an_error_from_an_override_names_the_override_and_one_from_the_file_names_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n  keep_checkpoints: -2\n")
    with pytest.raises(ConfigError, match=r"^override 'train.steps=0': train.steps: must be > 0"):
        load_config(SFTConfig, None, ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"^override 'train={steps: 0}': train.steps: must be > 0"):
        load_config(SFTConfig, p, ["train={steps: 0}"])
    with pytest.raises(ConfigError, match=r"c.yaml: train.keep_checkpoints: must be >= 0"):
        load_config(SFTConfig, p, ["optim.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"^override 'optim.lrr=1': unknown config key 'optim.lrr'"):
        load_config(SFTConfig, p, ["optim.lrr=1"])


def test_a_key_given_twice_and_a_binary_config_file_are_config_errors(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\ntrain:\n  steps: 5\noptim:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: invalid YAML: .*key 'optim' is given twice"):
        load_config(SFTConfig, p)
    b = tmp_path / "bin.yaml"
    b.write_bytes(b"\xff\xfe\x00model: tiny")
    with pytest.raises(ConfigError, match="bin.yaml: not UTF-8 text"):
        load_config(SFTConfig, b)
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(SFTConfig, tmp_path)
