"""Every shipped example config is loaded and run at tiny scale."""

from pathlib import Path

import pytest
import yaml

from posttrain.config import RECIPE_CONFIGS, config_from_dict
from posttrain.tasks import get_task

EXAMPLES = sorted(Path(__file__).resolve().parent.parent.joinpath("examples").glob("*.yaml"))
TINY = ["train.steps=2", "train.progress=false", "train.save_every=0", "train.eval_every=0"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    d = tmp_path_factory.mktemp("model")
    tok = build_tokenizer("char")
    build_tiny_model("tiny", tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    import json

    rows = get_task("arithmetic").rows(40)
    out = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with out.open("w") as fh:
        for r in rows:
            wrong = r["completion"].replace(f"{{{r['answer']}}}", f"{{{int(r['answer']) + 1}}}")
            fh.write(
                json.dumps({"prompt": r["prompt"], "chosen": r["completion"], "rejected": wrong, "answer": r["answer"]})
                + "\n"
            )
    return out


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    from posttrain.config import ModelConfig
    from posttrain.models.scalar import load_scalar

    d = tmp_path_factory.mktemp("rm")
    model, tok = load_scalar(ModelConfig(path=str(tiny_model_dir), device="cpu"))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_at_tiny_scale(path, tmp_path, tiny_model_dir, pairs_file, reward_model_dir):
    data = yaml.safe_load(path.read_text())
    recipe = data.pop("recipe", None) or path.name.split("_")[0]
    overrides = [f"train.output_dir={tmp_path / 'run'}", *TINY]
    model = data.get("model")
    if isinstance(model, str) and model.startswith("runs/"):
        overrides.append(f"model={tiny_model_dir}")  # the example's documented upstream run
    if recipe in ("preference", "reward_model"):
        overrides.append(f"data.path={pairs_file}")
        if data.get("loss") == "kto":
            overrides.append("data.eval_fraction=0.1")
    if recipe in ("grpo", "ppo"):
        overrides += [
            "data.num_examples=50",
            "prompts_per_step=2",
            "num_generations=2",
            "max_completion_length=8",
            "eval_examples=4",
        ] + (["max_gen_batches=1"] if recipe == "grpo" else [])
    if recipe == "ppo":  # the example's reward model is the documented upstream run's
        rewards = [
            dict(r, options={**r.get("options", {}), "path": str(reward_model_dir)})
            if r["name"] == "reward_model"
            else r
            for r in data["rewards"]
        ]
        data["rewards"] = rewards
    if recipe in ("pretrain", "sft"):
        overrides += ["data.num_examples=64"]
    cfg = config_from_dict(RECIPE_CONFIGS[recipe], data, overrides)
    module = recipe  # each recipe is posttrain.recipes.<name>
    import importlib

    final = importlib.import_module(f"posttrain.recipes.{module}").train(cfg)
    assert (Path(final) / "COMPLETE").exists()
