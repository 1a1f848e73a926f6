"""`posttrain make-pairs`: sample completions from a model, score them with a verifier, write preference
pairs (or KTO rows) for the preference recipes. With ``--judge DIR`` a local judge model ranks each prompt's
samples pairwise instead, every pair judged in both orders (RLAIF; pipeline/pairs.py, rewards/pairwise.py):

    posttrain make-pairs --model sft --data prompts.jsonl --judge runs/judge/final -n 4 --out pairs.jsonl \\
        --judge-options pairwise.yaml --judge-margin 0.2     # pairwise.yaml: {template: "...", labels: [A, B]}
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from posttrain.commands import verifier_options
from posttrain.config import ModelConfig, at_least
from posttrain.data.formats import validate
from posttrain.data.io import read_rows, write_jsonl
from posttrain.models.loading import load_model
from posttrain.pipeline.pairs import format_stats, make_pairs
from posttrain.rewards import load as load_verifier
from posttrain.rewards.pairwise import PairwiseJudge, check_options
from posttrain.runtime.files import atomic_write_json


def _ranker(p: argparse.ArgumentParser, a: argparse.Namespace) -> tuple[object | None, PairwiseJudge | None]:
    """(verifier, None) or, with --judge, (None, the pairwise judge); a usage error for a mixed command line."""
    if not a.judge:
        if a.judge_option or a.judge_options or a.judge_margin is not None:
            p.error("--judge-option, --judge-options and --judge-margin configure a judge: give --judge DIR")
        return load_verifier(a.verifier or "math", **verifier_options.from_args(a)), None
    if a.verifier or a.option or a.options:
        p.error("--judge ranks the samples instead of a verifier: drop --verifier / --option / --options")
    if a.kto or a.gold_column:
        p.error(
            "--judge gives preferences between samples, not a verdict per sample: --kto and --gold-column need a verifier"
        )
    options = {**verifier_options.from_args(a, "judge-option", "judge"), "path": a.judge}
    if a.judge_margin is not None:
        options["margin"] = a.judge_margin
    options.setdefault("device", a.device)
    check_options(options)  # before the policy loads: a bad template or label set is named first
    return None, PairwiseJudge(**options)


def main(argv: list[str]) -> int:
    """posttrain make-pairs --model DIR --data FILE (--verifier NAME | --judge DIR) -n 8 --out pairs.jsonl [--kto]"""
    p = argparse.ArgumentParser(prog="posttrain make-pairs", description=main.__doc__)
    p.add_argument("--model", required=True, help="local model directory to sample from")
    p.add_argument(
        "--data", required=True, help="prompt rows with the verifier columns (answer, ...) or builtin:<task>"
    )
    p.add_argument("--split", default="train")
    p.add_argument("--verifier", default=None, help="built-in verifier name or pkg.module:function (default: math)")
    verifier_options.add_arguments(p)
    p.add_argument(
        "--judge",
        default="",
        metavar="DIR",
        help="rank the samples with this local judge model instead: each pair judged in both orders, averaged; "
        "position-inconsistent pairs and judge failures are never preferences",
    )
    verifier_options.add_arguments(p, "judge-option", "pairwise judge")
    p.add_argument(
        "--judge-margin",
        type=float,
        default=None,
        help="an averaged preference within this of 0.5 is a tie, not a pair (default 0.1)",
    )
    p.add_argument("-n", type=at_least(2), default=8, help="samples per prompt")
    p.add_argument("--out", required=True, help="output jsonl (written atomically)")
    p.add_argument("--kto", action="store_true", help="write prompt/completion/label rows instead of pairs")
    p.add_argument("--max-new-tokens", type=at_least(1), default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--pairs-per-prompt", type=at_least(1), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=at_least(0), default=0, help="use the first N rows only")
    p.add_argument("--num-examples", type=at_least(0), default=0, help="builtin tasks: rows to generate")
    p.add_argument("--device", default="auto")
    p.add_argument("--stats", default="", help="also write the counts as json here")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--engine", default="native", choices=["native", "vllm"], help="rollout engine")
    p.add_argument(
        "--gold-column",
        default="",
        help="column with a reference solution: a prompt with no correct "
        "sample takes it as chosen (if the verifier accepts it)",
    )
    a = p.parse_args(argv)
    rows = read_rows(a.data, a.split, num_examples=a.num_examples, seed=a.seed)
    validate(rows, "prompt")
    data = rows.rows[: a.limit] if a.limit else rows.rows
    verifier, judge = _ranker(p, a)
    model, tok = load_model(ModelConfig(path=a.model, device=a.device))
    try:
        out, stats = make_pairs(
            model,
            tok,
            data,
            verifier,
            a.n,
            max_new_tokens=a.max_new_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            pairs_per_prompt=a.pairs_per_prompt,
            kto=a.kto,
            seed=a.seed,
            progress=a.progress,
            engine=a.engine,
            gold_column=a.gold_column,
            judge=judge,
        )
    finally:
        for ranker in (verifier, judge):
            getattr(ranker, "close", lambda: None)()
    write_jsonl(a.out, out)
    print(format_stats(stats, a.kto))
    print(f"wrote {len(out)} rows to {a.out}")
    if a.stats:
        atomic_write_json(a.stats, asdict(stats))
    return 0
