"""Everything a run or a pipeline refers to, resolved before anything starts: data sources, model
directories, reward and evaluation verifiers, and (for a pipeline) every stage's run directory.

A typo in the last stage of a pipeline used to surface after the first stages had trained for hours,
and a recipe run left a directory behind for a config that could never run. Here every problem is
collected and reported at once, each naming the stage and the field, before a directory is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from posttrain.config import ConfigError
from posttrain.data.io import DataError, Rows, check_source, heldout_split, read_rows
from posttrain.models import tiny
from posttrain.models.checkpoint import is_complete
from posttrain.models.loading import ModelError, tokenizer_problem
from posttrain.models.scalar import check_scalar_dir
from posttrain.rewards.pairwise import check_options as check_pairwise
from posttrain.rewards.registry import VerifierLoadError, check, data_problems
from posttrain.run.rundir import RunDirError, check_run_dir, config_diff, format_changes, is_safe, read_saved_config


def model_problem(path: str, tokenizer: str = "") -> str | None:
    if tiny.is_preset(path):
        return None
    if not (Path(path) / "config.json").is_file():
        return f"neither a tiny preset ({', '.join(tiny.PRESETS)}) nor a model directory with a config.json"
    return tokenizer_problem(tokenizer or path)


def verifier_problem(name: str, options: dict) -> str | None:
    """Resolve the verifier (its name, a user's module and function, its option names) without
    constructing it: a verifier may be costly to build (one that loads a model), and the run builds it
    again anyway. Option values are checked when the run builds it."""
    try:
        check(name, **options)
    except VerifierLoadError as e:
        return str(e)
    return None


def recipe_problems(cfg: Any, *, will_exist: Iterable[str] = ()) -> list[str]:
    """Problems of one recipe config, by field. Driven by field names, so any recipe's `data`, `model`,
    `ref_model` and `rewards` are checked. ``will_exist``: paths an earlier pipeline stage will write
    (its exported model, a stage's pairs file), which need not exist yet."""
    later = set(will_exist)
    problems = []
    data = getattr(cfg, "data", None)
    readable = []  # (field, path, split) of the data sources that check out: the rewards' contracts read them
    for name in ("path", "eval_path"):
        value = getattr(data, name, None)
        if value is None or value in later or (name == "eval_path" and not value):
            continue
        split = heldout_split(value, data.split) if name == "eval_path" else data.split
        problem = check_source(value, split)
        if problem:
            problems.append(f"data.{name}={value!r}: {problem}")
        else:
            readable.append((f"data.{name}", value, split))
    model = getattr(getattr(cfg, "model", None), "path", None)
    tokenizer = getattr(getattr(cfg, "model", None), "tokenizer", "")
    if model is not None and model not in later and (problem := model_problem(model, tokenizer)):
        problems.append(f"model.path={model!r}: {problem}")
    ref = getattr(cfg, "ref_model", None)
    if isinstance(ref, str) and ref not in ("initial", "") and ref not in later and (problem := model_problem(ref)):
        problems.append(f"ref_model={ref!r}: {problem}")
    rewards = getattr(cfg, "rewards", ()) or ()
    sources = _read(readable, data.num_examples, cfg.train.seed) if rewards and readable else []
    for i, reward in enumerate(rewards):
        if problem := verifier_problem(reward.name, dict(reward.options)):
            problems.append(f"rewards[{i}].name={reward.name!r}: {problem}")
            continue
        for field, rows in sources:  # the reward's data contract, on every row it will score
            problems += [
                f"rewards[{i}] ({reward.name}) on {field}: {x}"
                for x in data_problems(reward.name, dict(reward.options), rows.rows, rows.where)
            ]
        path = reward.options.get("path") if reward.name == "reward_model" else None
        if path is not None and str(path) not in later and (problem := reward_model_problem(str(path))):
            problems.append(f"rewards[{i}].options.path={path!r}: {problem}")
    critic = getattr(getattr(cfg, "critic", None), "init", None)
    if critic not in (None, "policy", "reward_model") and critic not in later and (problem := model_problem(critic)):
        problems.append(f"critic.init={critic!r}: {problem}")
    return problems


def _read(sources: list[tuple[str, str, str]], num_examples: int, seed: int) -> list[tuple[str, Rows]]:
    """The rows a recipe's rewards will score (training and held-out data), read as the run will read them;
    a source that fails to read here is the run's to report, with its own message."""
    out = []
    for field, path, split in sources:
        try:
            out.append((field, read_rows(path, split, num_examples=num_examples, seed=seed)))
        except DataError:
            continue
    return out


def reward_model_problem(path: str) -> str | None:
    try:
        check_scalar_dir(path, "path")
    except ModelError as e:
        return str(e).split(": ", 1)[-1]
    return None


def check_recipe(cfg: Any, recipe: str) -> None:
    problems = recipe_problems(cfg)
    if problems:
        raise ConfigError(f"{recipe}: {len(problems)} problem(s), nothing was started:\n  " + "\n  ".join(problems))


def pipeline_problems(cfg: Any, plans: list) -> list[str]:
    """Every problem of every stage (``plans`` from `pipeline.plan`), the evaluation and the controls."""
    problems = []
    e = cfg.eval
    if problem := check_source(e.data, e.split):
        problems.append(f"eval.data={e.data!r}: {problem}")
    if problem := verifier_problem(e.verifier, dict(e.verifier_options)):
        problems.append(f"eval.verifier={e.verifier!r}: {problem}")
    elif not check_source(e.data, e.split):
        try:
            rows = read_rows(e.data, e.split, num_examples=e.examples, seed=cfg.seed)
        except DataError:
            rows = None
        if rows is not None:
            found = data_problems(e.verifier, dict(e.verifier_options), rows.rows[: e.examples or None], rows.where)
            problems += [f"eval.verifier={e.verifier!r} on eval.data: {x}" for x in found]
    written: set[str] = set()
    for i, p in enumerate(plans):
        label = f"stages[{i}] ({p.name})" if not p.control_of else f"controls ({p.name})"
        pairs_file = str(p.dir / "pairs.jsonl")
        if p.pairs is not None:
            if problem := check_source(p.pairs.data):
                problems.append(f"{label}: make_pairs.data={p.pairs.data!r}: {problem}")
            if p.pairs.pairwise_judge:
                judge = p.pairs.pairwise_judge
                try:
                    check_pairwise({**p.pairs.pairwise_judge_options, "path": judge}, path_exists=judge not in written)
                except (ValueError, ModelError) as e:
                    problems.append(f"{label}: make_pairs.pairwise_judge={judge!r}: {e}")
            elif problem := verifier_problem(p.pairs.verifier, {}):
                problems.append(f"{label}: make_pairs.verifier={p.pairs.verifier!r}: {problem}")
        problems += [f"{label}: {x}" for x in recipe_problems(p.cfg, will_exist=written | {pairs_file})]
        if is_complete(p.final):
            # Not trained on this run: its record must still match the config that claims it.
            saved = read_saved_config(p.dir) if (p.dir / "config.yaml").exists() else None
            changed = {k: v for k, v in config_diff(saved, p.cfg).items() if not is_safe(k)} if saved else {}
            if changed:
                problems.append(
                    f"{label}: {p.dir} is complete, but with another config:\n{format_changes(changed)}\n"
                    f"  restore these values, or delete {p.dir} to run the stage again"
                )
        else:
            try:
                check_run_dir(p.cfg, p.recipe)
            except RunDirError as err:
                problems.append(f"{label}: {err}")
        if not p.control_of:
            written.add(str(p.final))
    return problems
