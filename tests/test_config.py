import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from posttrain.config import RECIPE_CONFIGS, ConfigError, SFTConfig, config_from_dict, field_help, load_config, to_dict

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

    cfg = config_from_dict(
        PPOConfig,
        {"critic": "reward_model", "rewards": [{"name": "reward_model"}]},
        ["critic.lr=3e-4", "model=tiny", "model.dtype=bfloat16"],
    )
    assert (cfg.critic.init, cfg.critic.lr, cfg.model.path, cfg.model.dtype) == (
        "reward_model",
        3e-4,
        "tiny",
        "bfloat16",
    )


@pytest.mark.parametrize(
    "override, message",
    [
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
    ],
)
def test_every_range_is_checked_at_load_time_naming_the_override(override, message):
    with pytest.raises(ConfigError, match=f"override '{re.escape(override)}': {message}"):
        load_config(SFTConfig, None, ["data.path=train.jsonl", override])


def test_grpo_ranges_and_the_reward_list_are_checked_at_load_time():
    from posttrain.config import GRPOConfig

    for override, message in [
        ("top_p=2", r"top_p: must be in \(0, 1\]"),
        ("rewards=[{name: math, weight: .nan}]", r"rewards\[0\].weight: must be a finite"),
        ("max_completion_length=300", "data.max_length: 256 leaves no room for a prompt"),
    ]:
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


# --- the config rejects what its consumer rejects (issue 19's papercuts) -----------------------------------


@pytest.mark.parametrize(
    "recipe,override,field",
    [
        ("grpo", "eps_low=1.5", "eps_low"),  # losses/policy.py: eps_low in [0, 1); ran, exit 0
        ("grpo", "eps_low=1.0", "eps_low"),
        ("ppo", "eps_high=-0.1", "eps_high"),
        ("grpo", "rollout_is_cap=0", "rollout_is_cap"),  # losses/importance.py: cap > 0
        ("preference", "label_smoothing=0.5", "label_smoothing"),  # losses/preference.py: [0, 0.5)
        ("ppo", "lam=1.5", "lam"),
        ("ppo", "critic.value_clip=-0.1", "critic.value_clip"),
        ("grpo", "diagnostics.collapse_share=1.5", "diagnostics.collapse_share"),  # a warning that could never fire
        ("grpo", "diagnostics.entropy_ratio=1.5", "diagnostics.entropy_ratio"),
        ("grpo", "diagnostics.collapse_steps=0", "diagnostics.collapse_steps"),
        ("grpo", "vllm.gpu_memory_utilization=1.5", "vllm.gpu_memory_utilization"),
    ],
)
def test_a_value_its_consumer_rejects_fails_at_load_naming_the_field(recipe, override, field):
    with pytest.raises(ConfigError, match=rf"override '{re.escape(override)}': {re.escape(field)}: must be"):
        load_config(RECIPE_CONFIGS[recipe], None, [override])


def test_eps_low_above_one_stops_the_command_before_anything_runs(tmp_path, capsys):
    from posttrain.commands.main import main

    out = tmp_path / "r"
    assert main(["grpo", "model=tiny", "data.path=builtin:arithmetic", "eps_low=1.5", f"train.output_dir={out}"]) == 2
    assert "eps_low: must be in [0, 1), got 1.5" in capsys.readouterr().err and not out.exists()


def _numeric_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            yield from _numeric_fields(type(default), f"{prefix}{f.name}.")
        elif isinstance(default, tuple) and default and dataclasses.is_dataclass(default[0]):
            yield from _numeric_fields(type(default[0]), f"{prefix}{f.name}[].")
        elif not isinstance(default, bool) and (isinstance(default, (int, float)) or f.name == "beta"):
            yield f"{prefix}{f.name}", f.name


def test_every_numeric_field_of_every_recipe_has_a_range_or_a_reason():
    """A new numeric field must say what values it takes (config/loading.py's ranges), or why any finite
    value will do (UNBOUNDED), so the config never accepts what its consumer rejects."""
    from posttrain.config import loading

    declared = set(loading._RANGES) | loading._POSITIVE | loading._NON_NEGATIVE | set(loading.UNBOUNDED)
    missing = sorted(
        {path for cls in RECIPE_CONFIGS.values() for path, name in _numeric_fields(cls) if name not in declared}
    )
    assert missing == []


@pytest.mark.parametrize(
    "recipe,overrides,field",
    [
        ("grpo", ["eval_every=100"], "eval_every"),  # held-out accuracy every 100 steps, on nothing
        ("ppo", ["eval_every=10"], "eval_every"),
        ("sft", ["train.eval_every=10", "data.eval_fraction=0"], "train.eval_every"),
        ("preference", ["train.eval_every=10", "data.eval_fraction=0"], "train.eval_every"),
        ("reward_model", ["train.eval_every=10", "data.eval_fraction=0"], "train.eval_every"),
    ],
)
def test_an_evaluation_asked_for_with_nothing_to_evaluate_on_is_a_config_error(recipe, overrides, field):
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: \d+ asks for .* set (data.eval_path|one of them)"):
        load_config(RECIPE_CONFIGS[recipe], None, overrides)
    # with something to evaluate on, the same request loads
    fix = "data.eval_path=builtin:arithmetic" if field == "eval_every" else "data.eval_fraction=0.1"
    load_config(RECIPE_CONFIGS[recipe], None, [*overrides, fix])
