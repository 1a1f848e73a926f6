"""Rollouts: steps 1-2 of every RL recipe (GRPO, PPO), in one place.

``Rollouts`` holds what a recipe samples and scores with (the prompts and the epoch's place in them, the
rewards, the rollout engine, the held-out rows); ``Rollouts.round`` draws this rank's share of P prompts,
G completions each (``sample_groups``), scored into one ``Group`` per prompt. Sampling is seeded per
output row (``rollout_seeds``), so a rollout does not depend on how it is batched or split over ranks.
``rollout_metrics`` and ``write_samples`` are what the recipes log of a rollout.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import ConfigError, RLConfig
from posttrain.data.collate import EpochSampler
from posttrain.data.formats import reward_columns, validate
from posttrain.data.io import DataError, read_rows
from posttrain.data.tokenize import prompt_ids as encode_prompt
from posttrain.envs import STOP_REASONS, EpisodeRunner
from posttrain.models.loading import load_model
from posttrain.rewards import build_reward, is_correct
from posttrain.rewards.composite import RewardFault
from posttrain.rewards.registry import answer_reader
from posttrain.rl.groups import Group
from posttrain.rl.watch import RunWatch, held_out_metrics
from posttrain.rollout import make_engine
from posttrain.rollout.engine import SamplingParams, row_seeds
from posttrain.run import loop
from posttrain.runtime.files import atomic_write_json, keep_steps_upto

log = logging.getLogger("posttrain")


def rollout_seeds(seed: int, step: int, round_: int, rows: range) -> list[int]:
    """The sampling seed of each output row of a rollout round: a function of (seed, step, round, row), so
    the samples do not depend on how the rows are batched or split over data-parallel ranks."""
    return row_seeds((seed, step, round_), rows)


def encode_prompts(tok, rows, max_length: int, max_completion_length: int) -> tuple[list[list[int]], list[int]]:
    """(token ids of every row's prompt, indices of the rows whose prompt leaves room for a completion:
    ``data.max_length`` counts prompt + completion)."""
    prompt_ids = [encode_prompt(tok, r["prompt"]) for r in rows.rows]
    room = max_length - max_completion_length
    usable = [i for i, p in enumerate(prompt_ids) if len(p) <= room]
    if len(usable) < len(prompt_ids):
        log.warning(
            "%s: %d of %d prompts are longer than %d tokens (data.max_length=%d - max_completion_length=%d) "
            "and are dropped",
            rows.source,
            len(prompt_ids) - len(usable),
            len(prompt_ids),
            room,
            max_length,
            max_completion_length,
        )
    if not usable:
        raise DataError(
            f"{rows.source}: no prompt fits in {room} tokens (data.max_length={max_length} "
            f"- max_completion_length={max_completion_length})"
        )
    return prompt_ids, usable


def sample_groups(
    engine,
    tok,
    rows: list[dict],
    prompt_ids: list[list[int]],
    picked: list[int],
    G: int,
    sampling: SamplingParams,
    reward_fn,
    timing: dict,
    seeds: list[int] | None = None,
    where: list[str] | None = None,
    runner: EpisodeRunner | None = None,
) -> list[Group]:
    """Steps 1-2 for the rows ``picked``: G samples each from ``engine`` (``seeds``: one per sample, see
    ``rollout_seeds``), scored by ``reward_fn`` (the dataset's extra columns reach the verifiers), as one
    Group per prompt. ``timing["reward"]`` gains the scoring time; ``where`` (``Rows.where``) names the data
    rows in a reward fault's message. Shared by every RL recipe (GRPO, PPO). The rewards are trained on as
    they come: ``reward_fn`` (a `RewardFunction`) has already failed or zeroed any non-finite one, per
    ``reward_non_finite``.

    With a ``runner`` (envs.EpisodeRunner) each sample is a multi-turn episode: its completion is the
    trajectory after the prompt (the policy's turns and the environment's tokens, ``sampled_masks`` telling
    them apart), its text the last policy turn (what final-answer verifiers score), and the rewards also see
    the columns ``env_reward`` (the environment's summed step rewards) and ``stop_reason``."""
    row_of = [i for i in picked for _ in range(G)]
    columns = {k: [rows[i].get(k) for i in row_of] for k in reward_columns(rows[picked[0]])}
    masks = episodes = None
    if runner is None:
        gen = engine.generate([prompt_ids[i] for i in picked], G, sampling, seeds=seeds)
        completions, truncated, logps = gen.completion_ids, gen.truncated, gen.logps
        texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
        lengths = [len(c) for c in completions]
    else:
        turn_seeds = (
            None if seeds is None else (lambda turn: [row_seeds((s,), range(turn, turn + 1))[0] for s in seeds])
        )
        eps = runner.run(engine, [rows[i] for i in picked], G, sampling, turn_seeds)
        completions = [e.traj.completion_ids for e in eps]
        truncated = [e.truncated for e in eps]
        logps = [e.traj.completion_logps for e in eps] if sampling.return_logps else None
        texts = [e.final_text for e in eps]
        lengths = [e.traj.num_sampled for e in eps]
        for k in range(len(picked)):
            if len({tuple(e.traj.ids[: e.traj.prompt_len]) for e in eps[k * G : (k + 1) * G]}) > 1:
                raise ValueError(
                    f"environment {runner.name!r}: reset() gave different first observations for one row; a "
                    "group's G episodes must start from the same prompt (draw randomness from the row, e.g. a seed column)"
                )
        masks = [tuple(e.traj.completion_mask) for e in eps]
        episodes = [e.summary() for e in eps]
        columns["env_reward"] = [e.env_reward for e in eps]
        columns["stop_reason"] = [e.stop_reason for e in eps]
    t0 = time.time()
    scores = reward_fn(
        texts,
        [rows[i]["prompt"] for i in row_of],
        columns,
        completion_lengths=lengths,
        where=[where[i] for i in row_of] if where is not None else None,
    )
    timing["reward"] += time.time() - t0
    components = dict(scores.components)
    for c in getattr(reward_fn, "components", ()):  # a rubric's criteria, each logged as reward/<key>/<criterion>
        for name, values in (getattr(c.verifier, "last_criteria", None) or {}).items():
            components[f"{c.key}/{name}"] = list(values)
    total = torch.tensor(scores.total, dtype=torch.float32)
    if not torch.isfinite(total).all():  # never clamp a fault into a trainable number
        raise RewardFault(
            "reward_fn returned a non-finite total; score with verifiers.build_reward, which applies "
            "the reward_non_finite policy"
        )
    faulty = [i // G for i in scores.non_finite]
    excluded = set(scores.excluded)  # samples without a reward (judge failures under exclude)
    statuses = scores.row_statuses  # {"<reward>/<status>": [row, ...]}

    def part(xs, k):
        return None if xs is None else tuple(tuple(x) if isinstance(x, list) else x for x in xs[k * G : (k + 1) * G])

    return [
        Group(
            row,
            tuple(prompt_ids[row]) if runner is None else tuple(eps[k * G].traj.ids[: eps[k * G].traj.prompt_len]),
            part(completions, k),
            tuple(texts[k * G : (k + 1) * G]),
            tuple(truncated[k * G : (k + 1) * G]),
            tuple(total[k * G : (k + 1) * G].tolist()),
            {n: tuple(v[k * G : (k + 1) * G]) for n, v in components.items()},
            faulty.count(k),
            part(logps, k),
            part(masks, k),
            None if episodes is None else tuple(episodes[k * G : (k + 1) * G]),
            tuple(i in excluded for i in range(k * G, (k + 1) * G)) if excluded else None,
            {key: sum(k * G <= i < (k + 1) * G for i in rows_) for key, rows_ in statuses.items()}
            if statuses
            else None,
        )
        for k, row in enumerate(picked)
    ]


@dataclass
class Rollouts:
    """What an RL recipe (GRPO, PPO) samples, scores and evaluates with: the prompts and where the epoch is,
    the rewards, the rollout engine and the held-out rows. ``round`` is one generation round of P prompt
    groups; ``state_dict`` is what a checkpoint needs to resume it exactly."""

    cfg: RLConfig  # a GRPOConfig or PPOConfig
    rows: object  # data.io.Rows
    tok: object
    prompt_ids: list[list[int]]
    usable: list[int]
    eval_rows: list[dict]
    sampler: EpochSampler
    reward_fn: object
    engine: object
    sampling: SamplingParams
    runner: EpisodeRunner | None = None  # multi-turn episodes (cfg.env); None: single-turn

    @classmethod
    def build(cls, cfg, rows, model, tok) -> Rollouts:
        reward_fn = build_reward(
            [(r.name, r.weight, r.options) for r in cfg.rewards],
            workers=cfg.reward_workers,
            non_finite=cfg.reward_non_finite,
        )
        for c in reward_fn.components:  # a judge trained against: its audit passes, or the run warns / refuses
            if c.weight != 0 and callable(getattr(c.verifier, "audit_check", None)):
                c.verifier.audit_check()
        engine = make_engine(
            cfg.rollout_engine,
            model,
            tok,
            decode=cfg.rollout_decode,
            vllm=cfg.vllm,
            seed=cfg.train.seed,
            max_model_len=cfg.data.max_length,
        )  # prompt + completion
        # The engine's log-probs feed the mismatch metrics (vllm) and the off-policy correction.
        runner = (
            EpisodeRunner(cfg.env, tok, context=cfg.data.max_length, turn_tokens=cfg.max_completion_length)
            if cfg.env.enabled
            else None
        )
        sampling = SamplingParams(
            cfg.max_completion_length,
            cfg.temperature,
            cfg.top_p,
            return_logps=cfg.rollout_engine != "native" or cfg.rollout_is != "none",
            stop_ids=runner.stop_ids if runner is not None else (),
        )
        prompt_ids, usable = encode_prompts(tok, rows, cfg.data.max_length, cfg.max_completion_length)
        eval_rows = (
            read_rows(cfg.data.eval_path, "test", seed=cfg.train.seed).rows[: cfg.eval_examples]
            if cfg.data.eval_path
            else []
        )
        sampler = EpochSampler(len(usable), cfg.train.seed, shuffle=cfg.data.shuffle)
        return cls(cfg, rows, tok, prompt_ids, usable, eval_rows, sampler, reward_fn, engine, sampling, runner)

    def start(self, run, model, state: dict, start: int) -> None:
        """Continue from a checkpoint's ``state`` (or start afresh: an empty one). Writes ``rewards.json``:
        each reward's name, weight, options and, for a judge or rubric, its identity (the model's fingerprint,
        the template's hash, labels, mode)."""
        dist = run.dist
        if dist.is_main:
            atomic_write_json(run.dir / "rewards.json", reward_record(self.reward_fn))
        if state:
            with dist.unsharded(model):
                self.engine.sync_weights()  # the checkpoint's weights replaced those the engine started from
            self.sampler.load_state_dict(state["sampler"])
            load_reward_state(self.reward_fn, state.get("rewards", {}), dist)  # e.g. the `random` control's draws
            if dist.is_main:
                keep_steps_upto(run.dir / "samples.jsonl", start)  # steps after the checkpoint run again
        elif dist.is_main and (run.dir / "samples.jsonl").exists():
            (run.dir / "samples.jsonl").unlink()

    def round(self, model, dist, step: int, round_: int, timing: dict) -> list[Group]:
        """Steps 1-2 for the next P prompts: this rank's share of them (whole groups, so the group
        baselines are exact), G samples each, scored."""
        cfg = self.cfg
        picked = [self.usable[i] for i in self.sampler.take(cfg.prompts_per_step)]
        mine, G = dist.slice(len(picked)), cfg.num_generations
        seeds = rollout_seeds(cfg.train.seed, step, round_, range(mine.start * G, mine.stop * G))
        with dist.unsharded(model):  # ranks stop decoding at different tokens: no per-layer gathers inside
            return sample_groups(
                self.engine,
                self.tok,
                self.rows.rows,
                self.prompt_ids,
                picked[mine],
                G,
                self.sampling,
                self.reward_fn,
                timing,
                seeds,
                self.rows.where,
                self.runner,
            )

    def sync(self, model, dist) -> None:
        """Push the updated policy (merged LoRA) into the engine before the next rollout (vllm; native: no-op)."""
        with dist.unsharded(model):
            self.engine.sync_weights()

    def evaluate(self, run, model, step: int, last: int, watch: RunWatch) -> dict:
        """Held-out metrics when ``eval_every`` says so (rank 0 generates alone, the others receive them);
        ``watch`` records the accuracy and exports ``best/`` under keep_best."""
        dist = run.dist
        if not (self.eval_rows and loop.should(self.cfg.eval_every, step, last)):
            return {}
        with dist.unsharded(model):  # rank 0 generates alone: no collective inside
            held = (
                held_out_metrics(
                    model,
                    self.tok,
                    self.eval_rows,
                    self.cfg,
                    self.engine if self.cfg.rollout_engine != "native" else None,
                    self.runner,
                )
                if dist.is_main
                else None
            )
        held = dist.broadcast(held)
        watch.evaluated(step, held["eval_accuracy"], lambda name: loop.export(run, model, self.tok, name))
        return held

    def record(self, run, model, step: int, last: int, generated: list[Group], metrics: dict, watch: RunWatch) -> bool:
        """The end of an RL step: the held-out evaluation when due, the diagnostics' verdict, the metrics
        and some sample completions written. True when ``stop_on`` says stop."""
        metrics.update(self.evaluate(run, model, step, last, watch))
        for c in self.reward_fn.components:  # a judge's cache: calls answered without running the judge
            if hasattr(c.verifier, "cache_hits"):
                metrics[f"reward/{c.key}/cache_hits"] = run.dist.sum(c.verifier.cache_hits)
                metrics[f"reward/{c.key}/cache_misses"] = run.dist.sum(c.verifier.cache_misses)
        stop = watch.check(step, metrics)
        run.tracker.log(step, metrics)
        every = self.cfg.samples_every
        if run.dist.is_main and (step == 1 or step == last or (every and step % every == 0)):
            write_samples(run.dir, step, generated, self.tok, self.rows.rows, self.reader()[1])
        return stop

    def reader(self):
        """(extract, gold) of the first reward, which defines correctness: ``rewards.answer_reader``."""
        return answer_reader(self.reward_fn.components[0].verifier)

    def state_dict(self, dist) -> dict:
        return {"sampler": self.sampler.state_dict(), "rewards": dist.gather(self.reward_fn.state_dict())}

    def close(self) -> None:
        self.reward_fn.close()
        self.engine.close()
        if self.runner is not None:
            self.runner.close()


def start_rl(cfg, recipe: str):
    """What every RL recipe (GRPO, PPO) starts with: (the run, its prompt rows, the policy before LoRA,
    its tokenizer)."""
    run = loop.start_run(cfg, recipe)
    if cfg.prompts_per_step % run.dist.world:
        raise ConfigError(
            f"prompts_per_step={cfg.prompts_per_step}: each of the {run.dist.world} ranks generates "
            f"whole groups, so it must be a multiple of the number of ranks"
        )
    rows = read_rows(cfg.data.path, cfg.data.split, num_examples=cfg.data.num_examples, seed=cfg.train.seed)
    validate(rows, "prompt")
    model, tok = load_model(cfg.model, seed=cfg.train.seed, device=run.load_device)
    return run, rows, model, tok


def load_reward_state(reward_fn, saved, dist) -> None:
    """Restore stateful rewards: one state per rank (a rank scores its own completions), or one state
    from a checkpoint of another shape (an older single-process one, or another number of ranks)."""
    if isinstance(saved, list):
        saved = saved[dist.rank] if len(saved) == dist.world else saved[0]
    reward_fn.load_state_dict(saved)


def rollout_metrics(groups: list[Group], stats) -> dict:
    totals = [r for g in groups for r in g.rewards]
    lengths = [g.num_sampled(i) for g in groups for i in range(len(g.completion_ids))]  # the policy's tokens
    trunc = [t for g in groups for t in g.truncated]
    out = {
        "gen_rounds": stats.rounds,
        "zero_variance_frac": stats.zero_variance_frac,
        "groups_trained": stats.kept_groups,
        "dynamic_sampling_short": float(stats.bound_reached),
        "reward/non_finite": sum(g.non_finite for g in groups),
    }
    t = torch.tensor(totals)
    out.update(
        {
            "reward/mean": t.mean().item(),
            "reward/std": t.std().item() if len(totals) > 1 else 0.0,
            "completion_len/mean": sum(lengths) / len(lengths),
            "completion_len/min": min(lengths),
            "completion_len/max": max(lengths),
            "truncation_rate": sum(trunc) / len(trunc),
        }
    )
    names = list(groups[0].components)
    for name in names:
        v = torch.tensor([x for g in groups for x in g.components[name]], dtype=torch.float32)
        v = v[~torch.isnan(v)]
        out[f"reward/{name}/mean"] = v.mean().item() if len(v) else 0.0
        out[f"reward/{name}/std"] = v.std().item() if len(v) > 1 else 0.0
    first = [x for g in groups for x in g.components[names[0]]]
    out["accuracy"] = sum(is_correct(x) for x in first) / len(first)
    out.update(episode_metrics([e for g in groups for e in g.episodes or ()]))
    n = sum(len(g.rewards) for g in groups)
    for key in sorted({k for g in groups for k in g.status_counts or {}}):
        # e.g. reward/judge/judge_failed: the share of the step's samples the judge gave no verdict for
        out[f"reward/{key}"] = sum((g.status_counts or {}).get(key, 0) for g in groups) / n
    if any(g.excluded for g in groups):
        out["reward/excluded"] = sum(sum(g.excluded or ()) for g in groups) / n
    return out


def episode_metrics(episodes: list[dict]) -> dict:
    """Multi-turn rollouts: turns, tool calls, tool and parse errors per trajectory, the stop-reason mix."""
    if not episodes:
        return {}
    n = len(episodes)
    out = {
        f"episode/{k}": sum(e[k] for e in episodes) / n
        for k in ("turns", "tool_calls", "tool_errors", "parse_errors", "timeouts")
    }
    out["episode/template_rewrites"] = sum(e["rewrites"] for e in episodes)
    for reason in STOP_REASONS:
        out[f"stop_reason/{reason}"] = sum(e["stop_reason"] == reason for e in episodes) / n
    return out


def write_samples(
    run_dir: Path, step: int, groups: list[Group], tok, rows: list[dict] | None = None, gold=None, per_step: int = 4
) -> None:
    """The first completion of the first ``per_step`` groups, with its reward and (``gold(row)``: the first
    reward's reading of the row) the answer it was scored against."""
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as fh:
        for g in groups[:per_step]:
            sample = {
                "step": step,
                "prompt": tok.decode(g.prompt_ids, skip_special_tokens=True),
                "completion": g.texts[0],
                "reward": g.rewards[0],
            }
            if g.episodes is not None:
                # The whole trajectory, the policy's turns and the environment's tokens as separate segments.
                sample["episode"] = g.episodes[0]
                sample["segments"] = segments(tok, g.completion_ids[0], g.sampled_mask(0))
            if rows is not None and gold is not None:
                sample["expected"] = gold(rows[g.row])
            fh.write(json.dumps(sample) + "\n")


def segments(tok, ids, mask) -> list[list[str]]:
    """[[who, text], ...]: the runs of a trajectory's tokens, "policy" where sampled, "env" elsewhere."""
    out: list[list[str]] = []
    start = 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or mask[t] != mask[start]:
            out.append(["policy" if mask[start] else "env", tok.decode(list(ids[start:t]), skip_special_tokens=False)])
            start = t
    return out


def reward_record(reward_fn) -> list[dict]:
    """What the run record says of each reward: its key, weight and, when it has one, its identity (a judge's
    model fingerprint, template hash, labels and mode)."""
    out = []
    for c in reward_fn.components:
        entry = {"key": c.key, "name": c.name, "weight": c.weight}
        if callable(getattr(c.verifier, "identity", None)):
            entry["identity"] = c.verifier.identity()
        out.append(entry)
    return out
