"""Chaining stages: pretrain -> SFT -> DPO -> GRPO (or SFT -> reward model -> PPO), with evaluation
between stages.

A pipeline config is an ordered list of stages, each a recipe config. A stage starts from the
previous stage's exported model unless its config names a model. Wherever a stage's config names a
model -- `model`, `ref_model`, `critic`, a reward model's `options.path` -- the name of an earlier
stage stands for that stage's exported model (e.g. GRPO against the SFT model rather than the DPO
model; PPO from `sft` with the reward model `rm`), so a pipeline can branch. A preference or reward-model
stage can build its pairs from the model it starts from (`make_pairs`), so a verifiable domain needs
no human labels. After every stage the policy is scored on a held-out set with the task's verifier
(a reward-model stage reports its held-out pair accuracy instead).

Re-running skips stages whose model and evaluation are complete and resumes an interrupted stage
from its newest checkpoint (each stage is an ordinary run directory with `resume: auto`).
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from rich.table import Table

from posttrain.config import (
    RECIPE_CONFIGS,
    ConfigError,
    EnvConfig,
    ModelConfig,
    config_from_dict,
    dict_doc,
    doc,
    is_data_file,
    locate_error,
    read_yaml,
    to_dict,
)
from posttrain.data.io import DataError, read_rows, write_jsonl
from posttrain.evaluation import evaluate_model_dir, versus_majority, wilson
from posttrain.models.checkpoint import MARKER, is_complete
from posttrain.models.loading import load_model
from posttrain.pipeline.judge_data import hard_negatives, judge_accuracy, judge_rows, source_key
from posttrain.pipeline.pairs import make_pairs
from posttrain.report import build_report
from posttrain.rewards import load as load_verifier
from posttrain.rewards.audit import run_audit
from posttrain.rewards.judge import JudgeReward
from posttrain.rewards.pairwise import PairwiseJudge
from posttrain.run.loop import setup_logging
from posttrain.run.preflight import pipeline_problems
from posttrain.runtime import distributed
from posttrain.runtime.files import atomic_write_json
from posttrain.runtime.tracking import read_metrics

log = logging.getLogger("posttrain")

CONTROL_VERIFIERS = {"random_reward": "random", "incorrect_reward": "incorrect", "format_reward": "format_only"}


@dataclass(frozen=True)
class EvalConfig:
    data: str = doc("builtin:arithmetic", "held-out prompt rows (split `test` of a builtin task)")
    split: str = doc("test", "split to read")
    verifier: str = doc("math", "verifier that scores a completion (1 = correct)")
    verifier_options: dict = dict_doc("options for the verifier")
    examples: int = doc(200, "how many held-out rows")
    k: int = doc(4, "samples per prompt for pass@k / maj@k / mean@k (0: greedy only)")
    temperature: float = doc(1.0, "sampling temperature for the k samples")
    max_new_tokens: int = doc(64, "generation budget")
    baseline: bool = doc(False, "also evaluate the model the first stage starts from")
    engine: Literal["native", "vllm"] = doc("native", "rollout engine for the evaluation: native | vllm")
    env: EnvConfig = doc(EnvConfig(), "multi-turn environment the answers are episodes in (name empty: single-turn)")
    episode_tokens: int = doc(0, "with env: most tokens of an episode, prompt included (0: the model's context)")

    def check(self) -> None:
        if self.split != "test" and is_data_file(self.data):
            raise ConfigError(
                f"split: {self.split!r} cannot apply to the file {self.data!r}: a single file has no "
                f"splits (they exist for dataset directories, hub datasets and builtin tasks)"
            )


@dataclass(frozen=True)
class PairsConfig:
    data: str = doc("", "prompt rows to sample from (empty: no pairs are made)")
    n: int = doc(8, "samples per prompt")
    limit: int = doc(0, "use the first N prompt rows (0: all)")
    verifier: str = doc("math", "verifier that separates chosen from rejected")
    temperature: float = doc(1.0, "sampling temperature")
    max_new_tokens: int = doc(64, "generation budget")
    pairs_per_prompt: int = doc(1, "pairs written per prompt")
    kto: bool = doc(False, "write KTO rows (prompt, completion, label) instead of pairs")
    judge: bool = doc(
        False,
        "write a judge's SFT rows instead (the judge prompt of the `judge` reward for each sample -> the verifier's "
        "Yes / No, balanced): an sft stage then trains a generative judge, evaluated against the verifier",
    )
    judge_eval_prompts: int = doc(100, "judge stages: held-out prompts (eval.data) whose samples measure the judge")
    judge_audit_rows: int = doc(
        20,
        "judge stages: held-out rows each attack of the judge audit (posttrain audit-verifier) is tried on; the "
        "report goes to the stage's audit.json, which a later `judge` reward names as `audit: <this stage>` (0: no audit)",
    )
    judge_audit_gold_template: str = doc(
        "{answer}",
        "judge stages: how the audit writes a row's reference answer as a completion ({answer} marks it): the "
        "policy's answer format, which a gated judge must let through (e.g. 'The answer is \\boxed{{answer}}.')",
    )
    judge_options: dict = dict_doc(
        "judge stages: the `judge` reward's options as a later stage will give them: its prompt (template, system, "
        "reference_column: what the judge rows render) and gates (what its evaluation and audit apply)"
    )
    engine: Literal["native", "vllm"] = doc("native", "rollout engine that samples: native | vllm")
    gold_column: str = doc(
        "",
        "column with a reference solution (e.g. completion): a prompt with no correct sample "
        "takes it as the chosen one, if the verifier accepts it (empty: off)",
    )
    pairwise_judge: str = doc(
        "",
        "a judge model directory, or an earlier stage's name, that ranks the samples instead of the verifier "
        "(RLAIF): each pair judged in both orders and averaged; position-inconsistent pairs, ties and judge "
        "failures are counted, never preferences (empty: the verifier ranks)",
    )
    pairwise_judge_options: dict = dict_doc(
        "the pairwise judge's options: template ({question}, {answer_a}, {answer_b}), labels (default [A, B]), "
        "margin (default 0.1: an average within it of 0.5 is a tie), system, mode, ..."
    )

    def check(self) -> None:
        if self.pairwise_judge and (self.kto or self.judge or self.gold_column):
            raise ConfigError(
                "pairwise_judge gives preferences between samples, not a verdict per sample: kto, judge and "
                "gold_column need the verifier"
            )
        if "path" in self.pairwise_judge_options:
            raise ConfigError("pairwise_judge_options.path: name the judge model in pairwise_judge")
        if self.judge and "{answer}" not in self.judge_audit_gold_template:
            raise ConfigError(
                f"judge_audit_gold_template {self.judge_audit_gold_template!r} has no {{answer}}: "
                "where the reference answer goes"
            )


@dataclass(frozen=True)
class StageConfig:
    name: str = doc("", "stage name (used in directory names, reports and ref_model references)")
    recipe: Literal["pretrain", "sft", "preference", "grpo", "reward_model", "ppo"] = doc(
        "sft", "which recipe runs the stage"
    )
    config: dict = dict_doc("the recipe's config (any field; model defaults to the previous stage's output)")
    make_pairs: PairsConfig = doc(PairsConfig(), "preference / reward_model stages: make pairs from the starting model")
    eval_env: bool = doc(True, "evaluate with eval.env (false: single-turn, e.g. a control branch without tools)")


@dataclass(frozen=True)
class PipelineConfig:
    output_dir: str = doc("runs/pipeline", "pipeline directory: stages/, pipeline.json, report.html")
    eval: EvalConfig = doc(EvalConfig(), "evaluation after every stage")
    stages: tuple[StageConfig, ...] = doc((), "the stages, in order")
    controls: tuple[str, ...] = doc(
        (), "spurious-reward reruns of the last RL stage: random_reward, incorrect_reward, format_reward"
    )
    seed: int = doc(0, "seed for evaluation sampling")

    def check(self) -> None:
        if not self.stages:
            raise ConfigError("stages: a pipeline needs at least one stage")
        if not self.output_dir.strip():
            raise ConfigError("output_dir: empty (it would make the working directory the pipeline directory)")
        names = [s.name for s in self.stages]
        for i, s in enumerate(self.stages):
            if not s.name:
                raise ConfigError(f"stages[{i}].name is empty")
            if names.count(s.name) > 1:
                raise ConfigError(f"stages[{i}].name {s.name!r} is used twice")
        for c in self.controls:
            if c not in CONTROL_VERIFIERS:
                raise ConfigError(f"controls: unknown control {c!r} (choose from {', '.join(CONTROL_VERIFIERS)})")
        if self.controls and not any(s.recipe == "grpo" for s in self.stages):
            raise ConfigError("controls: need a grpo stage to repeat with a spurious reward")


RECIPE_CONFIGS["pipeline"] = PipelineConfig
RECIPE_MODULES = {
    "pretrain": "posttrain.recipes.pretrain",
    "sft": "posttrain.recipes.sft",
    "preference": "posttrain.recipes.preference",
    "grpo": "posttrain.recipes.grpo",
    "reward_model": "posttrain.recipes.reward_model",
    "ppo": "posttrain.recipes.ppo",
}
PAIR_RECIPES = ("preference", "reward_model")  # stages that train on pairs, which make_pairs can write
AUDIT_FILE = "audit.json"  # a judge stage's audit report, beside its final model
JUDGE_PROMPT_OPTIONS = ("template", "system", "reference_column")  # what a judge row's prompt is rendered with
JUDGE_RECIPES = ("sft",)  # make_pairs with judge: true writes SFT rows


@dataclass
class StagePlan:
    """A stage with everything resolved: its directory, its typed recipe config, where it starts."""

    name: str
    recipe: str
    dir: Path
    cfg: Any
    start_model: str
    ref_label: str = ""
    pairs: PairsConfig | None = None
    control_of: str = ""
    start_stage: str = ""  # the earlier stage whose model this one starts from ("" for a model path)
    extra: dict = field(default_factory=dict)
    eval_env: bool = True  # evaluated in the pipeline's eval.env (StageConfig.eval_env)

    @property
    def final(self) -> Path:
        return self.dir / "final"


def _resolve_model_refs(data: dict, finals: dict[str, str]) -> None:
    """Replace the name of an earlier stage, wherever a model is named, by that stage's exported model."""

    def resolve(holder: dict, key: str) -> None:
        value = holder.get(key)
        if isinstance(value, str) and value in finals:
            holder[key] = finals[value]

    for key, sub in (("model", "path"), ("critic", "init")):
        if isinstance(data.get(key), dict):
            resolve(data[key], sub)
        else:
            resolve(data, key)
    resolve(data, "ref_model")
    for reward in data.get("rewards") or []:
        if isinstance(reward, dict) and isinstance(reward.get("options"), dict):
            resolve(reward["options"], "path")
            audit = reward["options"].get("audit")
            if isinstance(audit, str) and audit in finals:  # a judge stage's audit report
                reward["options"]["audit"] = str(Path(finals[audit]).parent / AUDIT_FILE)


def _stage_overrides(stage: StageConfig, start: str | None, out_dir: Path, finals: dict[str, str]) -> dict:
    data = json.loads(json.dumps(stage.config))  # deep copy of plain data
    if start is not None and "model" not in data:
        data["model"] = start
    train = dict(data.get("train") or {})
    train["output_dir"] = str(out_dir)
    data["train"] = train
    _resolve_model_refs(data, finals)
    return data


def plan(cfg: PipelineConfig) -> list[StagePlan]:
    """Resolve every stage's config up front, so a typo in stage 4 fails before stage 1 runs."""
    root = Path(cfg.output_dir)
    finals: dict[str, str] = {}
    plans: list[StagePlan] = []
    errors: list[str] = []  # every stage's, reported together
    prev: str | None = None
    for i, stage in enumerate(cfg.stages, 1):
        out = root / "stages" / f"{i:02d}_{stage.name}"
        data = _stage_overrides(stage, prev, out, finals)
        finals[stage.name] = prev = str(out / "final")
        try:
            rcfg = config_from_dict(RECIPE_CONFIGS[stage.recipe], data)
        except ConfigError as e:
            errors.append(f"stages[{i - 1}] ({stage.name}): {e}")
            continue
        model_path = rcfg.model.path
        ref = getattr(rcfg, "ref_model", "")
        ref_label = next((n for n, p in finals.items() if p == ref), ref)
        if not uses_reference(rcfg):  # ref_model has a default even where nothing loads it
            ref_label = ""
        elif ref_label == "initial":
            ref_label = f"initial ({next((n for n, p in finals.items() if p == model_path), model_path)})"
        pairs = stage.make_pairs if stage.make_pairs.data else None
        if pairs and stage.recipe not in (JUDGE_RECIPES if pairs.judge else PAIR_RECIPES):
            errors.append(
                f"stages[{i - 1}] ({stage.name}): make_pairs only applies to preference and reward_model stages "
                f"(with judge: true, to sft stages)"
            )
            continue
        if pairs and pairs.pairwise_judge in finals and pairs.pairwise_judge != stage.name:
            pairs = replace(pairs, pairwise_judge=finals[pairs.pairwise_judge])  # an earlier stage's model
        if pairs:
            # The pairs file is the stage's training data; it is written before the stage trains.
            rcfg = replace(rcfg, data=replace(rcfg.data, path=str(out / "pairs.jsonl")))
        start_stage = next((n for n, p in finals.items() if p == model_path), "")
        plans.append(
            StagePlan(
                stage.name,
                stage.recipe,
                out,
                rcfg,
                model_path,
                ref_label,
                pairs,
                start_stage=start_stage,
                eval_env=stage.eval_env,
            )
        )
    if errors:
        raise ConfigError(
            "\n".join(errors)
            if len(errors) == 1
            else f"{len(errors)} stages have config errors:\n  " + "\n  ".join(errors)
        )
    for control in cfg.controls:
        base = next(p for p in reversed(plans) if p.recipe == "grpo")
        out = root / "controls" / f"{base.name}_{control}"
        first = base.cfg.rewards[0]
        spurious = replace(first, name=CONTROL_VERIFIERS[control], options={})
        # The recipe's own held-out checks score with its first reward, here the spurious one: off (the
        # pipeline evaluates the control with the real verifier like every stage).
        rcfg = replace(
            base.cfg,
            rewards=(spurious,) + tuple(base.cfg.rewards[1:]),
            train=replace(base.cfg.train, output_dir=str(out)),
            data=replace(base.cfg.data, eval_path=""),
            keep_best=False,
            stop_on=tuple(k for k in base.cfg.stop_on if k != "eval_decline"),
        )
        plans.append(
            StagePlan(
                f"{base.name}_{control}",
                "grpo",
                out,
                rcfg,
                base.start_model,
                base.ref_label,
                control_of=base.name,
                start_stage=base.start_stage,
                eval_env=base.eval_env,
            )
        )
    return plans


def evaluate_stage_model(model_dir: str, cfg: PipelineConfig, env: bool = True) -> dict:
    """A model directory scored on the pipeline's held-out set (``cfg.eval``), as the summary records it;
    ``env``: in ``cfg.eval.env``'s episodes when it names one (a stage's ``eval_env``)."""
    e = cfg.eval
    return evaluate_model_dir(
        model_dir,
        e.data,
        split=e.split,
        limit=e.examples,
        num_examples=e.examples,
        verifier=e.verifier,
        verifier_options=e.verifier_options,
        k=e.k,
        temperature=e.temperature,
        max_new_tokens=e.max_new_tokens,
        seed=cfg.seed,
        engine=e.engine,
        env=e.env if env and e.env.enabled else None,
        max_length=e.episode_tokens,
    ).to_json()


def _pair_eval(stage_dir: Path) -> dict:
    """A reward-model stage's evaluation: its held-out pair accuracy (the last evaluation it logged)."""
    last = next((m for m in reversed(read_metrics(stage_dir)) if "eval_accuracy" in m), None)
    if last is None:
        return {"kind": "pairs", "pair_accuracy": None, "n_pairs": 0}
    n = int(last.get("eval_pairs", 0))
    acc = float(last["eval_accuracy"])
    return {
        "kind": "pairs",
        "pair_accuracy": acc,
        "pair_ci": wilson(acc * n, n),
        "n_pairs": n,
        "margin": last.get("eval_rewards/margin"),
    }


def _judge_audit(p: StagePlan, rows: list[dict]) -> dict:
    """The attacks that fool judges, on held-out rows (golds must pass), against the judge as the reward will
    use it (its gates too): the report goes to audit.json, which a later judge reward checks. A gated judge is
    audited without its gates as well, so the report shows what the gates stop."""
    options = {"path": str(p.final), **p.pairs.judge_options}
    audit = dict(probe_rows=p.pairs.judge_audit_rows, gold_template=p.pairs.judge_audit_gold_template)
    report = run_audit("judge", options, rows, **audit)
    atomic_write_json(p.dir / AUDIT_FILE, report.to_dict())
    out = report.summary()
    if options.get("gates"):
        bare = run_audit("judge", {**options, "gates": []}, rows, **audit).summary()
        without = {a["attack"]: a["rate"] for a in bare["attacks"]}
        out["attacks"] = [{**a, "rate_without_gates": without.get(a["attack"])} for a in out["attacks"]]
        out["ok_without_gates"] = bare["ok"]
    return out


def _judge_eval(p: StagePlan, cfg: PipelineConfig) -> dict:
    """A judge stage's evaluation: the trained judge against the verifier on samples of its starting model
    (the policy it was made from) for held-out prompts."""
    rows = read_rows(cfg.eval.data, cfg.eval.split, num_examples=p.pairs.judge_eval_prompts, seed=cfg.seed).rows
    policy, tok = load_model(ModelConfig(path=p.start_model))
    verifier = load_verifier(p.pairs.verifier, **cfg.eval.verifier_options)
    judge = JudgeReward(path=str(p.final), cache=False, **p.pairs.judge_options)
    audit = _judge_audit(p, rows) if p.pairs.judge_audit_rows else None
    try:
        out = judge_accuracy(
            judge,
            policy,
            tok,
            rows[: p.pairs.judge_eval_prompts],
            verifier,
            n=p.pairs.n,
            max_new_tokens=p.pairs.max_new_tokens,
            seed=cfg.seed,
        )
    finally:
        getattr(verifier, "close", lambda: None)()
    return {**out, "identity": judge.identity(), **({"audit": audit} if audit is not None else {})}


def _stage_eval(p: StagePlan, cfg: PipelineConfig) -> dict:
    if p.recipe == "reward_model":
        return _pair_eval(p.dir)
    if p.pairs is not None and p.pairs.judge:
        return _judge_eval(p, cfg)
    return evaluate_stage_model(str(p.final), cfg, p.eval_env)


def _make_pairs(plan_: StagePlan) -> int:
    """Write the stage's pairs.jsonl from its starting model; return how many pairs there are."""
    p = plan_.pairs
    path = plan_.dir / "pairs.jsonl"
    if path.exists():
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    rows = read_rows(p.data, "train", seed=plan_.cfg.train.seed)
    data = rows.rows[: p.limit] if p.limit else rows.rows
    ranker = dict(judge=PairwiseJudge(path=p.pairwise_judge, **p.pairwise_judge_options)) if p.pairwise_judge else {}
    model, tok = load_model(ModelConfig(path=plan_.start_model))
    verifier = None if ranker else load_verifier(p.verifier)
    try:
        out, stats = make_pairs(
            model,
            tok,
            data,
            verifier,
            p.n,
            **ranker,
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            pairs_per_prompt=p.pairs_per_prompt,
            kto=p.kto or p.judge,
            seed=plan_.cfg.train.seed,
            progress=plan_.cfg.train.progress,
            engine=p.engine,
            gold_column=p.gold_column,
        )
        if p.judge:
            sources = {source_key(r["prompt"]): r for r in data}
            negatives = hard_negatives(out, verifier, sources, seed=plan_.cfg.train.seed)
            prompt = {k: v for k, v in p.judge_options.items() if k in JUDGE_PROMPT_OPTIONS}
            out, counts = judge_rows(out + negatives, **prompt, sources=sources, seed=plan_.cfg.train.seed)
    finally:
        for closing in (verifier, *ranker.values()):
            getattr(closing, "close", lambda: None)()
    if p.judge:
        log.info(
            "stage %s: %d judge rows from %s (verifier said yes %d, no %d: %d near misses and master keys and %d "
            "swapped answers of %d made; balanced, real wrong samples first)",
            plan_.name,
            len(out),
            p.data,
            counts["yes"],
            counts["no"],
            counts["near_misses"],
            counts["swapped"],
            len(negatives),
        )
    else:
        log.info("stage %s: %d pairs from %s (%s)", plan_.name, len(out), p.data, stats)
    plan_.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_.dir / "pairs_stats.json", asdict(stats))  # e.g. a judge's position consistency
    if out:
        write_jsonl(path, out)
    return len(out)


def _pass_through(plan_: StagePlan, reason: str) -> None:
    """Publish the starting model unchanged as this stage's output (said loudly, and recorded)."""
    log.warning("stage %s: %s; the stage passes its starting model through unchanged", plan_.name, reason)
    tmp = plan_.dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(plan_.start_model, tmp)
    (tmp / MARKER).write_text("ok\n")
    shutil.rmtree(plan_.final, ignore_errors=True)
    tmp.rename(plan_.final)
    atomic_write_json(plan_.dir / "skipped.json", {"reason": reason})


def uses_reference(rcfg: Any) -> bool:
    """Does this stage load a reference model? Not GRPO / PPO with beta 0, not SimPO / ORPO, not a recipe
    without one (its ``ref_model`` default names nothing the run uses)."""
    if not hasattr(rcfg, "ref_model") or getattr(rcfg, "reference_free", False):
        return False
    return getattr(rcfg, "beta", None) != 0


def _write_summary(
    root: Path,
    cfg: PipelineConfig,
    entries: list[dict],
    controls: list[dict],
    baseline: dict | None,
    t0: float,
    prior_seconds: float = 0.0,
) -> None:
    """pipeline.json; ``total_seconds`` adds this invocation's time to what earlier ones recorded, so a rerun
    that finds every stage finished keeps the total (it used to overwrite it with its own 0.006 s)."""
    total = prior_seconds + time.time() - t0
    summary = {"stages": entries, "controls": controls, "total_seconds": total, "config": to_dict(cfg)}
    if baseline is not None:
        summary["baseline_eval"] = baseline
    atomic_write_json(root / "pipeline.json", summary)


def run(cfg: PipelineConfig) -> dict:
    setup_logging()
    dist = distributed.init()  # under torchrun the stages train data-parallel; the rest is rank 0's work
    root = Path(cfg.output_dir)
    plans = plan(cfg)
    # Every stage's data, models, verifiers and run directory, before the first stage (or any directory).
    problems = pipeline_problems(cfg, plans)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s), no stage was started:\n  " + "\n  ".join(problems))
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    previous = dist.broadcast(_read_json(root / "pipeline.json") if dist.is_main else None) or {}
    prior_seconds = {
        e["name"]: e.get("seconds", 0.0) for e in previous.get("stages", []) + previous.get("controls", [])
    }
    baseline = None
    if cfg.eval.baseline and Path(plans[0].start_model).is_dir() and dist.is_main:
        baseline = _read_json(root / "baseline_eval.json") or evaluate_stage_model(plans[0].start_model, cfg)
        atomic_write_json(root / "baseline_eval.json", baseline)
    entries: list[dict] = []
    controls: list[dict] = []
    for p in plans:
        eval_file = p.dir / "eval.json"
        started = time.time()
        if is_complete(p.final) and eval_file.exists():
            log.info("stage %s: complete, skipped", p.name)
            ev, seconds = _read_json(eval_file), prior_seconds.get(p.name, 0.0)
        else:
            log.info("stage %s (%s) from %s", p.name, p.recipe, p.start_model)
            made = dist.broadcast(_make_pairs(p) if dist.is_main and p.pairs and not is_complete(p.final) else None)
            if made == 0 and dist.is_main:
                # Every prompt's samples were all right or all wrong: nothing to prefer.
                reason = "make_pairs found no prompt with both a correct and an incorrect sample"
                if p.pairs.pairwise_judge:  # see pairs_stats.json: inconsistent, ties, judge failures
                    reason = "the pairwise judge preferred no sample over another in both orders"
                if p.recipe == "reward_model":  # its output is a reward model: the policy cannot stand in
                    raise DataError(f"stage {p.name}: {reason}; a reward model needs pairs to train on")
                _pass_through(p, reason)
            dist.barrier()
            if not is_complete(p.final):
                importlib.import_module(RECIPE_MODULES[p.recipe]).train(p.cfg)
            ev = dist.broadcast(_stage_eval(p, cfg) if dist.is_main else None)
            if dist.is_main:
                atomic_write_json(eval_file, ev)
                _warn_below_majority(p.name, ev)
            seconds = prior_seconds.get(p.name, 0.0) + time.time() - started
        entry = {
            "name": p.name,
            "recipe": p.recipe,
            "dir": str(p.dir.relative_to(root)),
            "eval": ev,
            "seconds": seconds,
            "start_model": p.start_model,
            "start_stage": p.start_stage,
            "ref_model": p.ref_label,
        }
        skipped = _read_json(p.dir / "skipped.json")
        if skipped:
            entry["skipped"] = skipped["reason"]
        if p.control_of:
            controls.append({**entry, "of": p.control_of})
        else:
            entries.append(entry)
        if dist.is_main:
            _write_summary(root, cfg, entries, controls, baseline, t0, previous.get("total_seconds", 0.0))
    if dist.is_main:
        build_report(root)
    return dist.broadcast(_read_json(root / "pipeline.json") if dist.is_main else None)


def _warn_below_majority(name: str, ev: dict) -> None:
    """A model whose accuracy interval reaches down to "always give the most common gold answer" has
    not shown it learned more than the answer distribution: say so where the stage ends."""
    verdict = versus_majority(ev)
    if verdict not in (None, "above"):
        log.warning(
            "stage %s: greedy accuracy %.1f%% [%.1f, %.1f] is %s the majority baseline %.1f%% (always answering %r)",
            name,
            100 * ev["greedy_accuracy"],
            100 * ev["greedy_ci"][0],
            100 * ev["greedy_ci"][1],
            verdict,
            100 * ev["majority_baseline"],
            ev.get("majority_answer"),
        )


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def load_pipeline(path: str | None, overrides: list[str] = ()) -> PipelineConfig:
    data = read_yaml(path) if path else {}
    data.pop("recipe", None)
    try:
        return config_from_dict(PipelineConfig, data, overrides)
    except ConfigError as e:
        raise locate_error(e, path, overrides) from None


def format_table(summary: dict) -> Any:
    """A rich table: held-out accuracy after every stage with its 95% interval."""
    t = Table(title="held-out accuracy after each stage")
    for col in ("stage", "recipe", "greedy acc [95% CI]", "pass@k", "maj@k", "time"):
        t.add_column(col)
    rows = ([("(start)", "", summary["baseline_eval"], 0.0)] if "baseline_eval" in summary else []) + [
        (e["name"], e["recipe"], e["eval"], e["seconds"]) for e in summary["stages"] + summary.get("controls", [])
    ]
    for name, recipe, ev, secs in rows:
        if ev.get("kind") == "pairs":  # a reward model: held-out pair accuracy
            acc, n = ev.get("pair_accuracy"), ev.get("n_pairs", 0)
            cell = "-" if acc is None else f"pairs {100 * acc:.1f}% (n={n})"
            t.add_row(name, recipe, cell, "-", "-", f"{secs:.0f}s")
            continue
        if ev.get("kind") == "judge":  # a judge: its agreement with the verifier on held-out samples
            lo, hi = ev["judge_ci"]
            cell = f"judge {100 * ev['judge_accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={ev['n_judged']})"
            t.add_row(name, recipe, cell, "-", "-", f"{secs:.0f}s")
            continue
        lo, hi = ev["greedy_ci"]
        k = ev.get("k") or 0
        t.add_row(
            name,
            recipe,
            f"{100 * ev['greedy_accuracy']:.1f}%  [{100 * lo:.1f}, {100 * hi:.1f}]",
            f"{100 * ev['pass_at_k']:.1f}% (k={k})" if k else "-",
            f"{100 * ev['maj_at_k']:.1f}%"
            if ev.get("maj_at_k") is not None
            else "- (no answer extractor)"
            if ev.get("maj_at_k_missing")
            else "-",
            f"{secs:.0f}s",
        )
    return t
