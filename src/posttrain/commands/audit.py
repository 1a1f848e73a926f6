"""`posttrain audit-verifier`: check a verifier before training on it.

Three questions, each answered from data rather than trust:
  1. Does every gold answer score 1? (A verifier that rejects golds teaches nothing; a mismatch usually
     means the gold format and the extraction disagree.)
  2. Does every adversarial completion score 0? (rewards/probes.py: hedges, empty/huge inputs, injection, code
     exit/equality/monkeypatch tricks.) Any reward there is a hack waiting for the policy to find it.
  3. Optionally, on completions sampled from the model to be trained: what fraction passes? ~all means
     the task (or the verifier) is too easy to give a learning signal; none means too hard.

A judge is audited like a verifier, with the attacks that fool LLM judges (rewards/audit.py):

    posttrain audit-verifier --verifier judge --option path=runs/judge/final --data rows.jsonl --json audit.json
    posttrain audit-verifier --verifier pairwise_judge --option path=DIR --data rows.jsonl   # both pair orders

It prints the false-positive rate per attack (a score >= --threshold where the truthful verdict is No).

Exit status: 0 when golds all pass and no probe gets reward (a judge: no attack's false-positive rate, nor
the share of rejected golds, above --max-false-positive), 1 otherwise, 2 on a usage or data error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from posttrain.commands import verifier_options
from posttrain.config import at_least
from posttrain.data.io import heldout_split, read_rows
from posttrain.evaluation import sample_completions
from posttrain.rewards.audit import AuditReport, ProbeResult, run_audit
from posttrain.rewards.probes import FAMILIES

# --- command line ------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of any data file the project reads (jsonl, json, parquet, csv, dataset dir, builtin:<task>);
    an error names the file and line."""
    return read_rows(str(path), heldout_split(str(path), "train")).rows


def _sample(args: argparse.Namespace, rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    prompts = []
    for i, row in enumerate(rows):
        prompt = row.get(args.prompt_column)
        if not isinstance(prompt, str):
            raise ValueError(
                f"row {i}: column {args.prompt_column!r} must be a string prompt to sample from, got {type(prompt).__name__}"
            )
        prompts.append(prompt)
    return sample_completions(args.model, prompts, args.n, args.max_new_tokens, args.temperature)


def _print_report(report: AuditReport) -> None:
    console = Console()
    n_gold_ok = len(report.gold) - len(report.gold_failures)
    console.print(
        f"[bold]audit of verifier {report.verifier!r}[/] (probe family {report.family}, {report.n_rows} rows, {report.seconds:.1f} s)"
    )
    shown = report.gold_template.replace("\n", "\\n")  # one line, backslashes as typed in a shell
    console.print(
        f"gold answers scoring 1: {n_gold_ok}/{len(report.gold)}, written as '{shown}' "
        f"(change with --gold-template '...{{answer}}...')",
        markup=False,
    )
    if report.gold_failures:
        table = Table(title="gold answers that fail")
        for col in ("row", "got", "reason"):
            table.add_column(col)
        for r in report.gold_failures[:20]:
            table.add_row(str(r.row), f"{r.got:.3g}", escape(r.reason or "(the verifier gave no reason)"))
        console.print(table)
    if report.threshold is None:
        table = Table(title="adversarial probes (each must score 0)")
        for col in ("probe", "verdict", "rewarded", "max got", "reasons"):
            table.add_column(col)
        by_name: dict[str, list[ProbeResult]] = {}
        for r in report.adversarial:
            by_name.setdefault(r.probe, []).append(r)
        for name, results in by_name.items():
            bad = [r for r in results if not r.passed]
            verdict = "[red]FAIL[/]" if bad else "[green]PASS[/]"
            reasons = ", ".join(sorted({r.reason for r in results if r.reason}))[:60]
            table.add_row(name, verdict, f"{len(bad)}/{len(results)}", f"{max(r.got for r in results):.3g}", reasons)
        console.print(table)
    else:
        console.print(_attack_table(report))
    _print_judge_checks(console, report)
    if report.calibration is not None:
        c = report.calibration
        console.print(
            f"sampled: {c.n_samples} completions for {c.n_prompts} prompts; pass {c.pass_fraction:.1%}, "
            f"mean reward {c.mean_reward:.3f}, prompts all-pass {c.prompts_all_pass:.1%}, none-pass "
            f"{c.prompts_none_pass:.1%} -> {c.verdict}"
        )
    for flag in report.flags:
        console.print(f"[yellow]! {escape(flag)}[/]")
    console.print("[green]OK[/]" if report.ok else "[red]FAILED[/]")


def _attack_table(report: AuditReport) -> Table:
    """A judge's false-positive rate per attack."""
    pairwise = report.family == "pairwise"
    what = "the attack preferred over the gold answer" if pairwise else f"score >= {report.threshold:g}"
    table = Table(
        title=f"attacks on the judge: false positive = {what} where the truthful verdict is No "
        f"(allowed: {report.max_false_positive:.0%} per attack)"
    )
    table.add_column("attack", no_wrap=True)
    for col in ["verdict", "false pos.", "FPR", "mean", "max", "failed", *(["orders agree"] if pairwise else [])]:
        table.add_column(col)
    for a in report.attack_rates:
        verdict = "[red]FAIL[/]" if a.rate > report.max_false_positive else "[green]PASS[/]"
        cells = [a.attack, verdict, f"{a.false_positives}/{a.n}", f"{a.rate:.0%}", f"{a.mean_score:.3g}"]
        cells += [f"{a.max_score:.3g}", str(a.judge_failed)]
        if pairwise:
            cells.append("-" if a.consistency is None else f"{a.consistency:.0%}")
        table.add_row(*cells)
    return table


def _print_judge_checks(console: Console, report: AuditReport) -> None:
    b = report.length_bias
    if b is not None and b.kind == "scores":
        console.print(
            f"length: the correct answer alone scores {b.short:.3g}, after filler {b.long:.3g} (difference "
            f"{b.difference:+.3g}, largest {b.max_abs_difference:.3g}, {b.n} rows); they should score alike"
        )
    elif b is not None:
        console.print(f"length: P(the correct answer after filler is better than it alone) = {b.long:.3g} ({b.n} rows)")
    if report.position_consistency is not None:
        console.print(f"position consistency (both orders prefer the same answer): {report.position_consistency:.0%}")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="posttrain audit-verifier", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--verifier",
        required=True,
        help="built-in name (math, code, json, label, format, regex, judge, rubric, ...), pairwise_judge, "
        "or pkg.module:function",
    )
    parser.add_argument("--data", required=True, help="a .jsonl file of rows with the gold column")
    verifier_options.add_arguments(parser)
    parser.add_argument(
        "--family", choices=FAMILIES, help="probe family (default: from --verifier; judge, rubric: judge)"
    )
    parser.add_argument("--gold-template", help="how to write a gold answer as a completion, with {answer}")
    parser.add_argument("--probe-rows", type=at_least(0), default=3, help="rows that get the adversarial probes")
    parser.add_argument("--limit", type=at_least(1), help="audit only the first N rows")
    parser.add_argument("--model", help="a model directory to sample completions from (calibration)")
    parser.add_argument("-n", type=at_least(1), default=4, help="samples per prompt with --model")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument(
        "--threshold",
        type=float,
        help="judges: a score at or above this is a Yes (default: the midpoint of the label scores, 0.5 for P(Yes))",
    )
    parser.add_argument(
        "--max-false-positive",
        type=float,
        help="the largest false-positive rate per attack (and share of rejected golds) that passes "
        "(default: 0.1 for a judge, 0 for a verifier)",
    )
    parser.add_argument("--json", dest="json_out", help="write the report as JSON here")
    args = parser.parse_args(list(argv))
    try:
        options = verifier_options.from_args(args)
        rows = read_jsonl(args.data)
        if args.limit is not None:
            rows = rows[: args.limit]
        sampled = _sample(args, rows) if args.model else None
        report = run_audit(
            args.verifier,
            options,
            rows,
            sampled,
            family=args.family,
            probe_rows=args.probe_rows,
            gold_template=args.gold_template,
            threshold=args.threshold,
            max_false_positive=args.max_false_positive,
        )
    except (OSError, ValueError, RuntimeError, ImportError, KeyError, TypeError) as exc:
        # Reported, with the cause, as a usage/data error (exit 2), not a verdict.
        print(f"posttrain audit-verifier: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    _print_report(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return 0 if report.ok else 1
