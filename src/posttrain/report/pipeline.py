"""A pipeline's report sections: accuracy per stage with the majority baseline, the control and branch
comparisons, the dynamic-sampling ablation, and each stage's run (``report/html.py`` draws those)."""

from __future__ import annotations

import copy
import json
from html import escape
from typing import Any

from posttrain.evaluation.stats import versus_baseline
from posttrain.report.html import (
    MEMORY_PARTS,
    RL_RECIPES,
    eval_comparison,
    fmt_pct,
    fmt_seconds,
    fmt_value,
    meta_line,
    metric_series,
    page,
    reward_roles,
    run_body,
    svg,
    when_text,
)
from posttrain.report.load import PipelineData, StageData, numeric


def _ev(st: StageData | None, key: str) -> Any:
    return (st.eval or {}).get(key) if st else None


def _k_cell(ev: dict | None, key: str, common_k: bool) -> str:
    if not ev or numeric(ev.get(key)) is None:
        return "—"
    suffix = "" if common_k else f" (k={ev.get('k')})"
    return fmt_pct(ev.get(key), ev.get(key + "_ci")) + suffix


def stage_table(p: PipelineData) -> str:
    rows: list[tuple[str, StageData]] = []
    if p.baseline_eval:
        rows.append(("baseline", StageData("before training", None, p.baseline_eval, None, None, None)))
    rows += [("stage", s) for s in p.stages] + [("control", c) for c in p.controls]
    ks = {_ev(s, "k") for _, s in rows if _ev(s, "pass_at_k") is not None}
    common = len(ks) == 1
    k = f"@{ks.pop()}" if common else "@k"
    head = [
        "stage",
        "recipe",
        "greedy accuracy [95% CI]",
        "majority baseline",
        "Δ vs previous",
        f"pass{k}",
        f"maj{k}",
        f"mean{k}",
        "prompts",
        "time",
        "reference model",
    ]
    out = ['<div class="scroll"><table><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    prev = None
    accs = {s.name: numeric(_ev(s, "greedy_accuracy")) for _, s in rows}
    for kind, s in rows:
        acc = numeric(_ev(s, "greedy_accuracy"))
        base = accs.get(s.start_stage) if s.start_stage else prev  # a branch: against the stage it started from
        d = f"{100 * (acc - base):+.1f} pp" if acc is not None and base is not None and kind != "control" else ""
        if d and s.start_stage:
            d += f" (vs {escape(s.start_stage)})"
        name = s.name + (f" (control of {s.of})" if kind == "control" and s.of else "")
        acc_cell = fmt_pct(acc, _ev(s, "greedy_ci"))
        if _ev(s, "kind") == "pairs":  # a reward model: its held-out pair accuracy
            acc_cell = f"pairs {fmt_pct(_ev(s, 'pair_accuracy'), _ev(s, 'pair_ci'))}"
        elif _ev(s, "kind") == "judge":  # a judge: its agreement with the verifier on held-out samples
            acc_cell = f"judge {fmt_pct(_ev(s, 'judge_accuracy'), _ev(s, 'judge_ci'))}"
        cells = [
            escape(name),
            escape(s.recipe or "—"),
            acc_cell,
            majority_cell(s.eval),
            d,
            _k_cell(s.eval, "pass_at_k", common),
            _k_cell(s.eval, "maj_at_k", common),
            _k_cell(s.eval, "mean_at_k", common),
            escape(str(_ev(s, "n_prompts") or "—")),
            fmt_seconds(s.seconds),
            escape(str(s.ref_model or "—")),
        ]
        out.append(
            f'<tr class="{kind}">'
            + "".join(f"<td class=num>{c}</td>" if 2 <= i <= 9 else f"<td>{c}</td>" for i, c in enumerate(cells))
            + "</tr>"
        )
        if kind != "control" and acc is not None:
            prev = acc
    out.append("</table></div>")  # wide: scrolls inside the page instead of widening it
    return "".join(out)


def majority_cell(ev: dict | None) -> str:
    """The accuracy of always giving the most common gold answer, flagged when the stage's greedy accuracy
    is not significantly above it (its 95% interval reaches down to the baseline) or below it."""
    base = numeric((ev or {}).get("majority_baseline"))
    if base is None:
        return "—"
    cell = f"{100 * base:.1f}% ({escape(str(ev.get('majority_answer')))})"
    ci = ev.get("greedy_ci")
    acc = numeric(ev.get("greedy_accuracy"))
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and numeric(ci[0]) is not None and acc is not None:
        verdict = versus_baseline(acc, (ci[0], ci[1]), base)
        if verdict != "above":
            cell += (
                f' <span class="badge bad" title="greedy accuracy {verdict} always giving the most common '
                f'answer">{verdict}</span>'
            )
    return cell


def accuracy_chart(p: PipelineData) -> str:
    def bar(label: str, ev: dict | None, kind: str) -> svg.Bar:
        ci = (ev or {}).get("greedy_ci")
        ok = isinstance(ci, (list, tuple)) and len(ci) == 2 and all(numeric(c) is not None for c in ci)
        return svg.Bar(label, numeric((ev or {}).get("greedy_accuracy")), tuple(ci) if ok else None, kind)

    bars = [bar("before training", p.baseline_eval, "baseline")] if p.baseline_eval else []
    bars += [bar(s.name, s.eval, "stage") for s in p.stages] + [bar(c.name, c.eval, "control") for c in p.controls]
    if not any(b.value is not None for b in bars):
        return '<p class="note">No stage has an evaluation.</p>'
    return (
        '<div class="wide">'
        + svg.bar_chart("Greedy accuracy per stage (95% CI)", bars, chart_id="accuracy per stage")
        + "</div>"
    )


def _stage_named(p: PipelineData, name: str | None) -> StageData | None:
    found = [s for s in p.stages if s.name == name] or [s for s in p.stages if s.recipe == name]
    return found[-1] if found else None


def _before(p: PipelineData, st: StageData, with_samples: bool = False) -> tuple[dict | None, str]:
    """The evaluation just before a stage ran (the stage it started from, else the previous stage's, or the
    baseline before the first); ``with_samples`` skips back over evaluations that kept no samples."""
    start = _stage_named(p, st.start_stage) if st.start_stage else None
    if start is not None and start.eval and (start.eval.get("samples") or not with_samples):
        return start.eval, f"after {start.name}"
    for prev in reversed(p.stages[: p.stages.index(st)]):
        if prev.eval and (prev.eval.get("samples") or not with_samples):
            return prev.eval, f"after {prev.name}"
    return p.baseline_eval, "before training"


def control_comparison(p: PipelineData) -> str:
    items = []
    for c in p.controls:
        real = _stage_named(p, c.of)
        ra, ca = numeric(_ev(real, "greedy_accuracy")), numeric(_ev(c, "greedy_accuracy"))
        if real is None or ra is None or ca is None:
            items.append(
                f"<li>{escape(c.name)}: cannot compare (stage {escape(str(c.of))} or an evaluation is missing).</li>"
            )
            continue
        rci, cci = _ev(real, "greedy_ci"), _ev(c, "greedy_ci")
        text = (
            f"<b>{escape(real.name)}</b> {fmt_pct(ra, rci)} vs control <b>{escape(c.name)}</b> "
            f"{fmt_pct(ca, cci)}: gain of the real reward over the control <b>{100 * (ra - ca):+.1f} pp</b>"
        )
        start = numeric((_before(p, real)[0] or {}).get("greedy_accuracy"))
        if start is not None:
            text += (
                f" (from {fmt_pct(start)} the real run moved {100 * (ra - start):+.1f} pp, "
                f"the control {100 * (ca - start):+.1f} pp)"
            )
        if isinstance(rci, (list, tuple)) and isinstance(cci, (list, tuple)) and len(rci) == len(cci) == 2:
            apart = rci[0] > cci[1] or cci[0] > rci[1]
            text += (
                ". The 95% intervals do not overlap."
                if apart
                else ". The 95% intervals overlap: this gain is not clearly separated from the control."
            )
        items.append(f"<li>{text}</li>")
    return f"<h3>Control comparison</h3><ul>{''.join(items)}</ul>" if items else ""


def _last(metrics: tuple[dict, ...], key: str) -> float | None:
    return next((numeric(m.get(key)) for m in reversed(metrics) if numeric(m.get(key)) is not None), None)


def branch_comparison(p: PipelineData) -> str:
    """PPO (critic + reward model) beside GRPO when a pipeline has both: what each learned (held-out accuracy,
    its gain over the stage it started from, how many completions ran into the length cap at the end) and
    what it held in memory, measured. The article's claim is about the memory column; a fair comparison of
    learning needs the same reward for both (benchmarks/ppo_vs_grpo_learning.py)."""
    rl = [s for s in p.stages if s.recipe in RL_RECIPES]
    if not any(s.recipe == "ppo" for s in rl) or not any(s.recipe == "grpo" for s in rl):
        return ""
    head = [
        "stage",
        "recipe",
        "from",
        "greedy accuracy [95% CI]",
        "gain over its start",
        "truncated (last 20 steps)",
        "models held",
        "peak MB",
        *(f"{k} MB" for k in MEMORY_PARTS),
        "s / step",
        "steps",
        "generated tokens",
        "time",
    ]
    out = ['<div class="scroll"><table><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    peaks = {}
    for s in rl:
        m = s.run.metrics if s.run else ()
        peaks[s.name] = max((numeric(r.get("memory/peak_mb")) or 0.0 for r in m), default=0.0) or None
        times = [v for _, v in metric_series(m, "step_time")]
        held = _last(m, "memory/models_held")
        start_ev, _ = _before(p, s)
        acc, start_acc = numeric(_ev(s, "greedy_accuracy")), numeric((start_ev or {}).get("greedy_accuracy"))
        trunc = [v for _, v in metric_series(m, "truncation_rate")][-20:]
        cells = [
            escape(s.name),
            escape(s.recipe or "—"),
            escape(s.start_stage or "—"),
            fmt_pct(_ev(s, "greedy_accuracy"), _ev(s, "greedy_ci")),
            "—" if acc is None or start_acc is None else f"{100 * (acc - start_acc):+.1f} pts",
            f"{100 * sum(trunc) / len(trunc):.0f}%" if trunc else "—",
            "—" if held is None else f"{held:.0f}",
            fmt_value(peaks[s.name]),
            *(fmt_value(_last(m, f"memory/{k}_mb")) for k in MEMORY_PARTS),
            fmt_value(sum(times) / len(times)) if times else "—",
            str(len(m)),
            f"{sum(r.get('tokens_per_s', 0) * r.get('step_time', 0) for r in m):,.0f}",
            fmt_seconds(s.seconds),
        ]
        out.append(
            "<tr>"
            + "".join(f"<td class=num>{c}</td>" if i >= 3 else f"<td>{c}</td>" for i, c in enumerate(cells))
            + "</tr>"
        )
    out.append("</table></div>")
    ppo = next(s.name for s in rl if s.recipe == "ppo")
    ratios = [
        f"{escape(s.name)}: {peaks[s.name] / peaks[ppo]:.2f}x {escape(ppo)}'s peak"
        for s in rl
        if s.recipe == "grpo" and peaks.get(s.name) and peaks.get(ppo)
    ]
    note = (
        "Memory is measured in each stage's own process state: exact bytes of the weights, gradients and "
        "optimizer state held, and the peak (CUDA max allocated, or CPU peak resident set since the stage "
        "began, which on CPU also counts memory the allocator kept from earlier stages); activations are "
        "the peak minus the rest. For a clean comparison at scale: benchmarks/grpo_vs_ppo.py."
    )
    return (
        f"<h3>RLHF (PPO with a critic + reward model) vs GRPO</h3>{''.join(out)}"
        + (f"<p>Peak memory, GRPO over PPO: {'; '.join(ratios)}.</p>" if ratios else "")
        + f'<p class="note">{note}</p>'
    )


JUDGE_REWARDS = ("judge", "rubric")


def _trains_a_judge(s: StageData) -> bool:
    trained, _ = reward_roles(s.run.config_text if s.run else None)
    return any(k.rstrip("0123456789").removesuffix("_") in JUDGE_REWARDS for k in trained)  # judge, judge_2


def judge_comparison(p: PipelineData) -> str:
    """RL against a judge (or a rubric) beside RL against the verifier from the same start: the judge's gain
    as a share of the verifier's, both measured by the verifier on held-out prompts (the judge's score is
    never the only measure of its own run: its proxy-vs-gold plot is in its stage's section)."""
    rl = [s for s in p.stages if s.recipe in RL_RECIPES and s.start_stage]
    lines = []
    for j in (s for s in rl if _trains_a_judge(s)):
        v = next((s for s in rl if s.start_stage == j.start_stage and not _trains_a_judge(s)), None)
        start = numeric((_ev(_stage_named(p, j.start_stage), "greedy_accuracy")))
        acc_j = numeric(_ev(j, "greedy_accuracy"))
        acc_v = numeric(_ev(v, "greedy_accuracy")) if v else None
        if None in (start, acc_j, acc_v):
            continue
        gain_j, gain_v = acc_j - start, acc_v - start
        share = f": <b>{100 * gain_j / gain_v:.0f}%</b> of the verifier's gain" if gain_v > 0 else ""
        lines.append(
            f"<li>from <b>{escape(j.start_stage)}</b> ({fmt_pct(start)}): <b>{escape(j.name)}</b> (against the judge) "
            f"{fmt_pct(acc_j, _ev(j, 'greedy_ci'))}, {100 * gain_j:+.1f} pts; <b>{escape(v.name)}</b> (against the "
            f"verifier) {fmt_pct(acc_v, _ev(v, 'greedy_ci'))}, {100 * gain_v:+.1f} pts{share}</li>"
        )
    if not lines:
        return ""
    return (
        "<h3>A judge as the reward vs the verifier (held-out accuracy, as the verifier measures it)</h3>"
        f"<ul>{''.join(lines)}</ul>"
    )


def ablation_section(p: PipelineData) -> str:
    """ablations.json: the same stage with one setting on and off at an equal generation budget."""
    items = []
    for a in p.ablations:
        on, off = a.get("on") or {}, a.get("off") or {}
        acc_on, acc_off = (numeric((x.get("eval") or {}).get("greedy_accuracy")) for x in (on, off))
        if acc_on is None or acc_off is None:
            continue
        ci_on, ci_off = (x["eval"].get("greedy_ci") for x in (on, off))
        tok = [numeric(x.get("generated_tokens")) for x in (on, off)]
        tokens = f" at {tok[0] / 1e6:.2f}M vs {tok[1] / 1e6:.2f}M generated tokens" if None not in tok else ""
        apart = (
            isinstance(ci_on, (list, tuple))
            and isinstance(ci_off, (list, tuple))
            and (ci_on[0] > ci_off[1] or ci_off[0] > ci_on[1])
        )
        items.append(
            f"<li><b>{escape(str(a.get('of')))}</b> {fmt_pct(acc_on, ci_on)} vs <b>{escape(str(a.get('name')))}</b> "
            f"({escape(str(a.get('what', '')))}) {fmt_pct(acc_off, ci_off)}{tokens}: "
            f"<b>{100 * (acc_on - acc_off):+.1f} pp</b> for the setting; the 95% intervals "
            f"{'do not overlap' if apart else 'overlap'}.</li>"
        )
    return f"<h3>Ablation</h3><ul>{''.join(items)}</ul>" if items else ""


def breakdown_table(bd: dict | None) -> str:
    """The verifier's view of a stage's greedy answers: a confusion matrix (gold label by row, answer by
    column, the diagonal marked) for a label task, the accuracy of each field for an extraction task."""
    if not isinstance(bd, dict):
        return ""
    if bd.get("kind") == "fields" and isinstance(bd.get("accuracy"), dict):
        rows = "".join(
            f"<tr><td>{escape(str(f))}</td><td class=num>{fmt_pct(numeric(a))}</td></tr>"
            for f, a in bd["accuracy"].items()
        )
        return f"<table><tr><th>field</th><th>accuracy (n={int(bd.get('n', 0))})</th></tr>{rows}</table>"
    if bd.get("kind") == "confusion" and isinstance(bd.get("counts"), dict):
        counts = bd["counts"]
        extra = sorted({a for row in counts.values() for a in row} - set(bd.get("labels", [])))
        cols = [*bd.get("labels", []), *extra]
        head = "<tr><th>gold \\ answer</th>" + "".join(f"<th>{escape(str(c))}</th>" for c in cols) + "</tr>"
        body = []
        for gold in bd.get("labels", []):
            row = counts.get(gold, {})
            cells = "".join(f'<td class="num{" diag" if c == gold else ""}">{int(row.get(c, 0))}</td>' for c in cols)
            body.append(f"<tr><th>{escape(str(gold))}</th>{cells}</tr>")
        return f'<div class="scroll"><table>{head}{"".join(body)}</table></div>'
    return ""


def judge_section(ev: dict) -> str:
    """A judge stage: how often it agrees with the verifier on held-out samples of the policy it was made from,
    and its audit (the false-positive rate of each attack that fools judges: a wrong answer it passes)."""
    if ev.get("kind") != "judge":
        return ""
    meta = [
        (
            "agrees with the verifier",
            f"{fmt_pct(ev.get('judge_accuracy'), ev.get('judge_ci'))} of {ev.get('n_judged')}",
        ),
        ("false positives", fmt_pct(ev.get("false_positive_rate"))),
        ("false negatives", fmt_pct(ev.get("false_negative_rate"))),
        ("judge failed", str(ev.get("judge_failed", 0))),
    ]
    parts = ["<h3>The judge against the verifier (held-out samples)</h3>", meta_line(meta)]
    audit = ev.get("audit")
    if isinstance(audit, dict) and isinstance(audit.get("attacks"), list):
        tol = numeric(audit.get("max_false_positive")) or 0.0
        gated = "ok_without_gates" in audit  # a gated judge, audited with and without its gates
        rows = "".join(
            f"<tr{' class=bad' if (numeric(a.get('rate')) or 0.0) > tol else ''}><td>{escape(str(a.get('attack')))}</td>"
            f"<td class=num>{int(a.get('n', 0))}</td><td class=num>{fmt_pct(a.get('rate'))}</td>"
            + (f"<td class=num>{fmt_pct(a.get('rate_without_gates'))}</td>" if gated else "")
            + f"<td class=num>{numeric(a.get('mean_score')) or 0.0:.3f}</td></tr>"
            for a in audit["attacks"]
        )
        head = "<th>attack</th><th>n</th><th>false positives</th>"
        head += "<th>without its gates</th>" if gated else ""
        verdict = "passed" if audit.get("ok") else "FAILED: " + "; ".join(map(str, audit.get("flags") or []))
        parts.append(
            f"<h3>Audit: false-positive rate per attack (score &ge; {numeric(audit.get('threshold')) or 0.5:g}; "
            f"tolerated {fmt_pct(tol)}): {escape(verdict)}</h3>"
            f"<p>golds rejected: {fmt_pct(audit.get('gold_rejection_rate'))} of {audit.get('n_gold')}; "
            f"long minus short answer: {numeric(audit.get('length_bias')) or 0.0:+.3f}</p>"
            f'<div class="scroll"><table><tr>{head}<th>mean score</th></tr>{rows}</table></div>'
        )
    return "".join(parts)


def stage_section(p: PipelineData, i: int, st: StageData) -> str:
    ev = st.eval or {}
    meta = [
        ("recipe", st.recipe or "unknown"),
        ("time", fmt_seconds(st.seconds)),
        ("greedy accuracy", fmt_pct(ev.get("greedy_accuracy"), ev.get("greedy_ci"))),
        ("reference model", str(st.ref_model or "—")),
        ("dir", st.dir or "—"),
    ]
    parts = [f'<h2 id="stage-{i}">Stage {i + 1}: {escape(st.name)}</h2>', meta_line(meta)]
    parts.append(judge_section(ev))
    if table := breakdown_table(ev.get("breakdown")):
        kind = "Confusion matrix" if ev["breakdown"].get("kind") == "confusion" else "Accuracy per field"
        parts.append(f"<h3>{kind} of the greedy answers (held-out)</h3>{table}")
    before, label = _before(p, st, with_samples=True)
    cmp = eval_comparison(before, label, st.eval, f"after {st.name}")
    if cmp:
        opened = " open" if st.recipe in RL_RECIPES else ""
        parts.append(f"<details{opened}><summary>Eval samples: before vs after this stage</summary>{cmp}</details>")
    parts.append(run_body(st.run, f"{st.name}: ") if st.run else '<p class="note">No run directory recorded.</p>')
    return "".join(parts)


def _without_samples(raw: dict) -> dict:
    out = copy.deepcopy(raw)
    evals = [out.get("baseline_eval")] + [
        e.get("eval") for e in (out.get("stages") or []) + (out.get("controls") or []) if isinstance(e, dict)
    ]
    for ev in evals:
        if isinstance(ev, dict) and isinstance(ev.get("samples"), list):
            ev["samples"] = f"<{len(ev['samples'])} samples, shown above>"
    return out


def render_pipeline(p: PipelineData) -> str:
    meta = [
        ("pipeline", f"{len(p.stages)} stage(s)" + (f" + {len(p.controls)} control(s)" if p.controls else "")),
        ("finished", when_text(p.finished)),
        ("total time", fmt_seconds(p.total_seconds)),
    ]
    nav = (
        '<nav><a href="#overview">overview</a>'
        + "".join(f'<a href="#stage-{i}">{escape(s.name)}</a>' for i, s in enumerate(p.stages))
        + "</nav>"
    )
    body = [
        '<h2 id="overview">Accuracy per stage</h2>',
        accuracy_chart(p),
        stage_table(p),
        control_comparison(p),
        branch_comparison(p),
        judge_comparison(p),
        ablation_section(p),
    ]
    body += [stage_section(p, i, s) for i, s in enumerate(p.stages)]
    body.append(
        "<h2>pipeline.json</h2><details><summary>pipeline.json (eval samples omitted)</summary>"
        f'<pre class="config">{escape(json.dumps(_without_samples(p.raw), indent=2, default=str))}</pre>'
        "</details>"
    )
    return page(p.name, meta, nav, "".join(body))
