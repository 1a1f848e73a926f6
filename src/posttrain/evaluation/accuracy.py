"""Evaluation with verifiers: greedy accuracy, pass@k (unbiased), maj@k and mean@k, with intervals.

    pass@k = E_prompts[ 1 - C(n - c, k) / C(n, k) ]      (Chen et al. 2021; n samples, c correct)
    maj@k  = E_prompts[ the most common extracted answer among k samples is correct ]
    mean@k = E_prompts[ c / n ]

Intervals: Wilson score interval for greedy accuracy (a proportion over prompts); for the per-prompt
averages a normal interval on the mean over prompts (t ~ 1.96), clipped to [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from posttrain.config import EnvConfig, ModelConfig
from posttrain.data.formats import reward_columns, validate
from posttrain.data.io import read_rows
from posttrain.data.tokenize import prompt_ids
from posttrain.envs import EpisodeRunner
from posttrain.evaluation.stats import majority_baseline, majority_correct, mean_ci, pass_at_k, versus_baseline, wilson
from posttrain.models.loading import load_model
from posttrain.rewards import extract_answer, is_correct, score_all
from posttrain.rewards import load as load_verifier
from posttrain.rewards.base import verifier_name
from posttrain.rewards.registry import Answers, answer_reader, per_text
from posttrain.rollout import make_engine
from posttrain.rollout.engine import KVCacheEngine, SamplingParams


@dataclass(frozen=True)
class EvalSummary:
    n_prompts: int
    greedy_accuracy: float
    greedy_ci: tuple[float, float]
    k: int = 0
    temperature: float = 0.0
    pass_at_k: float | None = None
    pass_at_k_ci: tuple[float, float] | None = None
    maj_at_k: float | None = None
    maj_at_k_ci: tuple[float, float] | None = None
    mean_at_k: float | None = None
    mean_at_k_ci: tuple[float, float] | None = None
    samples: list[dict] = field(default_factory=list)
    maj_at_k_missing: str | None = None  # why maj@k is not reported (the verifier has no answer extractor)
    breakdown: dict | None = None  # the verifier's own view of the greedy answers (confusion matrix, per field)
    majority_baseline: float | None = None  # accuracy of always answering the most common gold answer
    majority_answer: str | None = None

    @property
    def above_majority(self) -> bool | None:
        """Is greedy accuracy above the majority baseline by more than the noise (its 95% interval
        lies above it)? None without a gold column."""
        return None if self.majority_baseline is None else self.versus_majority == "above"

    @property
    def versus_majority(self) -> str | None:
        """above | not significantly above | below the majority baseline (``stats.versus_baseline``)."""
        if self.majority_baseline is None:
            return None
        return versus_baseline(self.greedy_accuracy, self.greedy_ci, self.majority_baseline)

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(
    model,
    tokenizer,
    rows: list[dict],
    verifier: Callable[..., float],
    *,
    k: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    answers: Answers | None = None,
    keep_samples: int = 8,
    engine=None,
    runner=None,
) -> EvalSummary:
    """Greedy accuracy on every row; with k > 0 also k samples per row for pass@k, maj@k, mean@k.
    ``engine``: a rollout engine to generate with (e.g. a recipe's vLLM engine); default: the native
    KV-cache engine on ``model``. ``answers(completions, rows)``: how maj@k and the kept samples' "got" read
    answers; default: the verifier's own (``rewards.registry.answer_reader``), which also gives each row's
    expected answer and the majority baseline's gold. ``runner`` (envs.EpisodeRunner): each answer is a
    multi-turn episode's last policy turn, scored with the episode's columns (env_reward, stop_reason) beside
    the row's."""
    engine = engine or KVCacheEngine(model, tokenizer, max_batch=batch_size)
    own_answers, gold = answer_reader(verifier)
    answers = answers or own_answers
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in rows]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    extras = [reward_columns(r) for r in rows]

    def complete(n: int, temp: float) -> tuple[list[str], list[dict]]:
        """n answers per row (row-major) and the columns each is scored with."""
        if runner is None:
            gen = engine.generate(prompts, n, SamplingParams(max_new_tokens, temperature=temp))
            return [decode(c) for c in gen.completion_ids], [ex for ex in extras for _ in range(n)]
        eps = runner.run(engine, rows, n, SamplingParams(max_new_tokens, temperature=temp, stop_ids=runner.stop_ids))
        cols = [{**extras[i // n], "env_reward": e.env_reward, "stop_reason": e.stop_reason} for i, e in enumerate(eps)]
        return [e.final_text for e in eps], cols

    texts, greedy_extras = complete(1, 0.0)
    scores = [float(x) for x in score_all(verifier, texts, greedy_extras)]
    correct = [is_correct(s) for s in scores]
    acc = sum(correct) / max(1, len(rows))
    got = (
        answers(texts[:keep_samples], greedy_extras[:keep_samples]) if answers and keep_samples else [None] * len(rows)
    )
    samples = [
        {"prompt": r["prompt"], "completion": t, "reward": s, "answer": r.get("answer"), "expected": gold(r), "got": a}
        for r, t, s, a in list(zip(rows, texts, scores, got))[:keep_samples]
    ]
    summary = dict(n_prompts=len(rows), greedy_accuracy=acc, greedy_ci=wilson(sum(correct), len(rows)), samples=samples)
    if hasattr(verifier, "breakdown"):
        summary["breakdown"] = verifier.breakdown(texts, extras)
    majority = majority_baseline(rows, gold)
    if majority is not None:
        summary.update(majority_baseline=majority[0], majority_answer=majority[1])
    if k > 0:
        p_at, maj, mean = [], [], []
        all_texts, all_extras = complete(k, temperature)
        all_ok = [is_correct(x) for x in score_all(verifier, all_texts, all_extras)]
        all_answers = answers(all_texts, all_extras) if answers is not None else None
        for i in range(len(extras)):
            ok = all_ok[i * k : (i + 1) * k]
            c = sum(ok)
            p_at.append(pass_at_k(k, c, k))
            mean.append(c / k)
            if all_answers is not None:
                maj.append(float(majority_correct(all_answers[i * k : (i + 1) * k], ok)))
        summary.update(
            k=k,
            temperature=temperature,
            pass_at_k=sum(p_at) / len(p_at),
            pass_at_k_ci=mean_ci(p_at),
            mean_at_k=sum(mean) / len(mean),
            mean_at_k_ci=mean_ci(mean),
        )
        if maj:
            summary.update(maj_at_k=sum(maj) / len(maj), maj_at_k_ci=wilson(sum(maj), len(maj)))
        elif answers is None:
            summary["maj_at_k_missing"] = (
                f"verifier {verifier_name(verifier)!r} exposes no answer extractor "
                f"(a reward function can: fn.extract_answer = a function text -> answer, or "
                f"fn.extract_row_answers = a function (completions, rows) -> answers)"
            )
    return EvalSummary(**summary)


def answer_extractor(verifier_name: str) -> Answers | None:
    """How maj@k reads answers for a verifier family without its own extractor (None: maj@k not defined)."""
    if verifier_name in ("math", "label", "incorrect", "format_only"):
        return per_text(extract_answer)
    return None


def sample_completions(
    model_path: str, prompts: list[Any], n: int, max_new_tokens: int, temperature: float
) -> list[list[str]]:
    """n sampled completions per prompt from a local model directory (used by audit-verifier)."""

    model, tok = load_model(ModelConfig(path=model_path))
    ids = [prompt_ids(tok, p) for p in prompts]
    gen = KVCacheEngine(model, tok).generate(ids, n, SamplingParams(max_new_tokens, temperature=temperature))
    texts = [tok.decode(c, skip_special_tokens=True) for c in gen.completion_ids]
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def evaluate_model_dir(
    model_dir: str,
    data: str,
    *,
    split: str = "test",
    limit: int = 0,
    num_examples: int = 0,
    verifier: str = "math",
    verifier_options: dict | None = None,
    k: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    engine: str = "native",
    env: EnvConfig | None = None,
    max_length: int = 0,
) -> EvalSummary:
    """Load a model directory and a prompt dataset, evaluate with a named verifier (used by
    `posttrain eval` and by the pipeline between stages); ``engine``: native | vllm. ``env``: every answer is
    a multi-turn episode in that environment, of at most ``max_length`` tokens (0: the model's context)."""

    check = load_verifier(verifier, **(verifier_options or {}))  # a bad name fails before any loading
    gen = runner = None
    try:
        rows = read_rows(data, split, num_examples=num_examples, seed=seed)
        validate(rows, "prompt")
        torch.manual_seed(seed)
        model, tok = load_model(ModelConfig(path=model_dir))
        data = rows.rows[:limit] if limit else rows.rows
        context = max_length or int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        if env is not None:
            runner = EpisodeRunner(env, tok, context=context, turn_tokens=max_new_tokens)
        if engine != "native":
            longest = max(len(prompt_ids(tok, r["prompt"])) for r in data)
            room = context if env is not None else longest + max_new_tokens
            gen = make_engine(engine, model, tok, max_batch=64, seed=seed, max_model_len=room)
        # maj@k needs the verifier's notion of "the answer": built-ins have one; a user function may
        # expose its own as an `extract_answer` (or `extract_row_answers`) attribute.
        answers = answer_reader(check).answers or answer_extractor(verifier)
        return evaluate(
            model,
            tok,
            data,
            check,
            k=k,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            answers=answers,
            engine=gen,
            runner=runner,
        )
    finally:
        getattr(check, "close", lambda: None)()
        if gen is not None:
            gen.close()
        if runner is not None:
            runner.close()


def format_summary(s: EvalSummary) -> str:
    def pct(x, ci):
        return f"{100 * x:5.1f}%  [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

    lines = [f"prompts: {s.n_prompts}", f"greedy accuracy: {pct(s.greedy_accuracy, s.greedy_ci)}"]
    if s.majority_baseline is not None:
        verdict = "" if s.above_majority else f"  <- {s.versus_majority.upper()} the majority baseline"
        lines.append(f"majority baseline (always {s.majority_answer!r}): {100 * s.majority_baseline:5.1f}%{verdict}")
    if s.k:
        lines.append(f"pass@{s.k} (T={s.temperature}): {pct(s.pass_at_k, s.pass_at_k_ci)}")
        lines.append(f"mean@{s.k}: {pct(s.mean_at_k, s.mean_at_k_ci)}")
        if s.maj_at_k is not None:
            lines.append(f"maj@{s.k}: {pct(s.maj_at_k, s.maj_at_k_ci)}")
        elif s.maj_at_k_missing:
            lines.append(f"maj@{s.k}: not computed: {s.maj_at_k_missing}")
    return "\n".join(lines)
