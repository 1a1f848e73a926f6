"""The HTML of a run report: formatting, curves, samples, one run's sections and the page around them
(a pipeline's sections are in ``report/pipeline.py``; ``posttrain report`` is ``report/__init__.py``).

The page is built from plain strings; every piece of text that came from a file (model completions, prompts,
config values, metric names) passes through ``escape`` exactly once, where it is placed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from html import escape
from typing import Any

import yaml

from posttrain.report import svg
from posttrain.report.load import RunData, numeric
from posttrain.rewards.composite import component_keys


@dataclass(frozen=True)
class ChartSpec:
    title: str
    keys: tuple[str, ...]  # metric names or fnmatch patterns, one line each, in legend order
    band: tuple[str, str] | None = None  # (low, high) metric names shaded around the first line
    std: str | None = None  # a std metric shaded as mean +- std around the first line
    y_range: tuple[float | None, float | None] = (None, None)
    needs: str | None = None  # drawn only when this metric was logged (not for the other keys alone)


CHARTS: tuple[ChartSpec, ...] = (
    ChartSpec("Reward", ("reward/mean", "reward/*/mean"), std="reward/std"),
    ChartSpec("Accuracy", ("accuracy", "eval_accuracy"), y_range=(0.0, 1.0)),
    ChartSpec(
        "Judge verdicts (share of samples)",
        ("reward/*/judge_failed", "reward/*/policy_invalid", "reward/*/gated", "reward/excluded"),
        y_range=(0.0, 1.0),
    ),
    ChartSpec("Entropy", ("entropy",)),
    ChartSpec("Truncation rate", ("truncation_rate",), y_range=(0.0, None)),
    ChartSpec(
        "Completion length (tokens)", ("completion_len/mean",), band=("completion_len/min", "completion_len/max")
    ),
    ChartSpec(
        "Episodes: per trajectory",
        ("episode/turns", "episode/tool_calls", "episode/tool_errors", "episode/parse_errors"),
        y_range=(0.0, None),
    ),
    ChartSpec("Episodes: stop reasons (share)", ("stop_reason/*",), y_range=(0.0, 1.0)),
    ChartSpec("KL to reference", ("kl",)),
    ChartSpec("Loss", ("loss", "eval_loss")),
    ChartSpec("Reward margin (chosen - rejected)", ("rewards/margin", "eval_rewards/margin")),
    ChartSpec("Reward-model scores", ("rewards/chosen", "rewards/rejected")),
    ChartSpec("Value loss (critic)", ("value_loss",)),
    ChartSpec("Explained variance (critic)", ("explained_variance",)),
    ChartSpec("Value clip fraction", ("value_clip_frac",), y_range=(0.0, None)),
    ChartSpec("Approximate KL of the update", ("approx_kl",)),
    ChartSpec("Preference accuracy", ("rewards/accuracy",), y_range=(0.0, 1.0)),
    ChartSpec("Log-probs: chosen vs rejected", ("logps/chosen", "logps/rejected")),
    ChartSpec("Clip fraction", ("clip_frac/low", "clip_frac/high"), y_range=(0.0, None)),
    ChartSpec(
        "Zero-variance groups",
        ("zero_variance_frac", "zero_variance/all_correct", "zero_variance/all_wrong"),
        y_range=(0.0, 1.0),
    ),
    ChartSpec(
        "Answer diversity: share of the most common answer",
        ("diversity/top_share", "diversity/gold_top_share", "diversity/no_answer"),
        y_range=(0.0, 1.0),
    ),
    ChartSpec(
        "Distinct answers (per group; batch per prompt)",
        ("diversity/group_distinct", "diversity/batch_distinct"),
        y_range=(0.0, None),
    ),
    ChartSpec(
        "Held-out: greedy vs pass@k",
        ("eval_accuracy", "eval_pass_at_k", "eval_majority_baseline"),
        y_range=(0.0, 1.0),
        needs="eval_pass_at_k",
    ),
    ChartSpec("Generation rounds per step", ("gen_rounds",), y_range=(0.0, None)),
    ChartSpec("Gradient norm", ("grad_norm",)),
    ChartSpec("Learning rate", ("lr",), y_range=(0.0, None)),
    ChartSpec("Throughput (tokens/s)", ("tokens_per_s",)),
    ChartSpec(
        "Memory (MB)",
        ("memory/peak_mb", "memory/weights_mb", "memory/grads_mb", "memory/optimizer_mb", "memory/activations_mb"),
        y_range=(0.0, None),
    ),
)
NOT_CHARTED = (
    "step",
    "wall_time",
    "epoch",
    "time/*",
    "warning/*",
    "memory/models_held",
    "memory/baseline_mb",
    "eval_pairs",
)  # bookkeeping, or drawn elsewhere (the time split)
MEMORY_PARTS = ("weights", "grads", "optimizer", "activations")
TIME_ORDER = ("time/generate", "time/reward", "time/logps", "time/update")
HEADLINE = (
    "reward/mean",
    "accuracy",
    "eval_accuracy",
    "loss",
    "eval_loss",
    "rewards/accuracy",
    "rewards/margin",
    "kl",
    "entropy",
)
RL_RECIPES = ("grpo", "ppo")
MAX_SAMPLES = 6  # per step shown from samples.jsonl
MAX_EVAL_ROWS = 8  # paired eval samples shown per stage

CSS = """
:root{--fg:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f9fafb;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1240px;margin:0 auto;padding:24px 28px 60px}
header{margin-bottom:8px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 8px;padding-top:8px;border-top:2px solid var(--line)}
h3{font-size:15px;margin:22px 0 8px}
.meta{color:var(--muted);font-size:13px}.meta span{margin-right:18px}.meta b{color:var(--fg);font-weight:600}
nav{font-size:13px;margin:6px 0 0}nav a{margin-right:14px;color:var(--accent);text-decoration:none}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(370px,1fr));gap:14px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px}
.wide{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px;display:inline-block;max-width:100%}
svg{max-width:100%;height:auto}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.stat{background:#fff;border:1px solid var(--line);border-radius:8px;padding:6px 12px;min-width:130px}
.stat .k{color:var(--muted);font-size:12px}.stat .v{font-size:16px;font-weight:600}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:8px 0}
.scroll{overflow-x:auto;max-width:100%}
th,td{border:1px solid var(--line);padding:5px 9px;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.diag{background:#e7f5ec;font-weight:600}
tr.baseline td{color:var(--muted)}tr.control td{background:#fffbeb}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font:12px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre.config{background:#fff;border:1px solid var(--line);border-radius:6px;padding:10px;max-height:520px;overflow:auto}
.samples{display:grid;grid-template-columns:1fr 1fr;gap:14px}
.sample{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 10px;margin-bottom:8px}
.sample .prompt{color:var(--muted);border-bottom:1px dashed var(--line);padding-bottom:4px;margin-bottom:4px}
.sample pre.completion{max-height:220px;overflow:auto}
.sample .env{display:block;background:#eef2ff;color:#3730a3;border-left:3px solid #818cf8;padding:0 6px;margin:2px 0}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;font-weight:600;margin-bottom:4px}
.good{background:#dcfce7;color:#166534}.bad{background:#fee2e2;color:#991b1b}.mid{background:#fef3c7;color:#92400e}
.na{background:#f3f4f6;color:var(--muted)}
table.pairs{width:100%;table-layout:fixed}table.pairs th:first-child{width:28%}
td.up{background:#f0fdf4}td.down{background:#fef2f2}
details{margin:10px 0}summary{cursor:pointer;color:var(--accent);font-weight:600}
.note{color:var(--muted);font-size:13px}.warn{color:#92400e;background:#fffbeb;border:1px solid #fde68a;
border-radius:6px;padding:6px 10px;font-size:13px}
"""


# ---------------------------------------------------------------- formatting


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_pct(v: Any, ci: Any = None) -> str:
    v = numeric(v)
    if v is None:
        return "—"
    out = f"{100 * v:.1f}%"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(numeric(c) is not None for c in ci):
        out += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return out


def fmt_value(v: Any) -> str:
    n = numeric(v)
    return "—" if n is None else svg.fmt_num(n) if abs(n) >= 1e-3 or n == 0 else f"{n:.2e}"


def as_text(v: Any) -> str:
    """A prompt or completion as plain text: chat messages become "role: content" lines."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(m, dict) and "content" in m for m in v):
        return "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in v)
    return json.dumps(v, ensure_ascii=False, indent=1, default=str)


def reward_badge(r: Any) -> str:
    v = numeric(r)
    if v is None:
        return '<span class="badge na">reward —</span>'
    cls = "good" if v >= 1 - 1e-9 else "bad" if v <= 1e-9 else "mid"
    return f'<span class="badge {cls}">reward {svg.fmt_num(v) if v else "0"}</span>'


def when_text(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d %H:%M") if dt else "—"


def meta_line(items: list[tuple[str, str]]) -> str:
    return '<div class="meta">' + "".join(f"<span>{escape(k)} <b>{escape(v)}</b></span>" for k, v in items) + "</div>"


# ---------------------------------------------------------------- curves


def metric_series(metrics: tuple[dict, ...], key: str) -> list[tuple[float, float]]:
    out = []
    for m in metrics:
        v = numeric(m.get(key))
        if v is not None:
            out.append((float(m["step"]), v))
    return out


def metric_keys(metrics: tuple[dict, ...]) -> list[str]:
    """Keys with at least one finite number, in first-seen order."""
    seen: dict[str, None] = {}
    for m in metrics:
        for k, v in m.items():
            if k not in seen and numeric(v) is not None:
                seen[k] = None
    return list(seen)


def _matching(keys: list[str], patterns: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for p in patterns:
        out += [k for k in keys if fnmatchcase(k, p) and k not in out]
    return out


def _band(metrics: tuple[dict, ...], spec: ChartSpec, key: str) -> tuple[tuple[float, float, float], ...]:
    out = []
    for m in metrics:
        mid = numeric(m.get(key))
        if spec.band:
            lo, hi = numeric(m.get(spec.band[0])), numeric(m.get(spec.band[1]))
        elif spec.std and mid is not None and numeric(m.get(spec.std)) is not None:
            lo, hi = mid - m[spec.std], mid + m[spec.std]
        else:
            continue
        if lo is not None and hi is not None:
            out.append((float(m["step"]), lo, hi))
    return tuple(out)


def charts(metrics: tuple[dict, ...], chart_prefix: str = "") -> tuple[list[str], list[str]]:
    """(the known charts, one chart per other numeric metric) for whichever metrics a run logged."""
    keys = metric_keys(metrics)
    used = set(_matching(keys, NOT_CHARTED))
    main = []
    for spec in CHARTS:
        present = _matching(keys, spec.keys)
        if not present or (spec.needs and spec.needs not in keys):
            continue
        series = [
            svg.Series(k, tuple(metric_series(metrics, k)), _band(metrics, spec, k) if i == 0 else ())
            for i, k in enumerate(present)
        ]
        used.update(present, spec.band or (), [spec.std] if spec.std else [])
        main.append(svg.line_chart(spec.title, series, chart_id=chart_prefix + spec.title, y_range=spec.y_range))
    other = [
        svg.line_chart(
            k, [svg.Series(k, tuple(metric_series(metrics, k)))], chart_id=chart_prefix + k, width=360, height=200
        )
        for k in keys
        if k not in used
    ]
    return main, other


def time_split(metrics: tuple[dict, ...], chart_prefix: str = "") -> str:
    """Seconds per phase of a step: a stacked area over steps plus a table of the means."""
    keys = _matching(metric_keys(metrics), TIME_ORDER + ("time/*",))
    if not keys:
        return ""
    rows = [m for m in metrics if any(numeric(m.get(k)) is not None for k in keys)]
    layers = [(k.removeprefix("time/"), [numeric(m.get(k)) or 0.0 for m in rows]) for k in keys]
    total = sum(sum(v) for _, v in layers) or 1.0
    table = ["<table><tr><th>phase</th><th>mean s / step</th><th>share</th><th>total</th></tr>"]
    for name, vals in layers:
        table.append(
            f"<tr><td>{escape(name)}</td><td class=num>{sum(vals) / len(vals):.3f}</td>"
            f"<td class=num>{100 * sum(vals) / total:.1f}%</td><td class=num>{fmt_seconds(sum(vals))}</td></tr>"
        )
    table.append("</table>")
    chart = ""
    if len(rows) > 1:
        chart = (
            '<div class="card">'
            + svg.stacked_area(
                "Seconds per step, by phase",
                [float(m["step"]) for m in rows],
                layers,
                chart_id=chart_prefix + "time split",
            )
            + "</div>"
        )
    return (
        f'<h3>Time split</h3><div class="grid">{chart}<div>{"".join(table)}'
        f'<p class="note">Seconds per step spent in each phase, over the {len(rows)} logged steps.</p>'
        f"</div></div>"
    )


def headline(metrics: tuple[dict, ...]) -> str:
    """Start -> end values of the metrics people look at first (means over a few steps at each end)."""
    cards = []
    for key in HEADLINE:
        pts = metric_series(metrics, key)
        if not pts:
            continue
        k = 1 if key.startswith("eval") else max(1, min(10, len(pts) // 10))
        start, end = (sum(v for _, v in pts[:k]) / k, sum(v for _, v in pts[-k:]) / k)
        cards.append(
            f'<div class="stat" title="mean of the first and last {k} logged value(s)">'
            f'<div class="k">{escape(key)}</div><div class="v">{fmt_value(start)} → {fmt_value(end)}</div></div>'
        )
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


# ---------------------------------------------------------------- samples


def _expected(sample: dict):
    """The answer a sample was scored against: the verifier's reading of its row (``expected``: a label, the
    canonical JSON of the checked fields), else the row's ``answer`` column; None when there is neither."""
    for key in ("expected", "answer"):
        if sample.get(key) is not None:
            return sample[key]
    return None


def _got(sample: dict) -> str:
    """The answer the verifier read from a completion (``got``: a label, canonical JSON, a program's output
    signature), as a note; empty when none was read."""
    got = sample.get("got")
    return f'<div class="note">got: {escape(as_text(got))}</div>' if got is not None else ""


def _trajectory(s: dict) -> str:
    """A multi-turn sample: the policy's turns as written, the environment's tokens (tool results, replies,
    the template's boundaries) set apart, and the episode's turns / tool calls / stop reason."""
    parts = "".join(
        escape(as_text(text)) if who == "policy" else f'<span class="env">{escape(as_text(text))}</span>'
        for who, text in s["segments"]
    )
    ep = s.get("episode") or {}
    line = ", ".join(
        f"{k.replace('_', ' ')}: {escape(as_text(ep[k]))}"
        for k in ("turns", "tool_calls", "tool_errors", "stop_reason")
        if k in ep
    )
    return f'<pre class="completion">{parts}</pre><div class="note">{line}</div>'


def _sample_card(s: dict) -> str:
    answer = f' <span class="note">expected: {escape(as_text(expected))}</span>' if (expected := _expected(s)) else ""
    body = (
        _trajectory(s)
        if s.get("segments")
        else f'<pre class="completion">{escape(as_text(s.get("completion", "")))}</pre>'
    )
    return (
        f'<div class="sample">{reward_badge(s.get("reward"))}{answer}'
        f'<pre class="prompt">{escape(as_text(s.get("prompt", "")))}</pre>{body}{_got(s)}</div>'
    )


def training_samples(samples: tuple[dict, ...]) -> str:
    """Completions sampled during RL: the first logged step beside the last."""
    steps = sorted({s["step"] for s in samples if numeric(s.get("step")) is not None})
    if not steps:
        return ""
    cols = []
    for step, when in ((steps[0], "start of training"), (steps[-1], "end of training")):
        if len(steps) == 1 and cols:
            break
        shown = [s for s in samples if s.get("step") == step][:MAX_SAMPLES]
        rewards = [numeric(s.get("reward")) for s in shown]
        mean = [r for r in rewards if r is not None]
        avg = f", mean reward {svg.fmt_num(sum(mean) / len(mean))}" if mean else ""
        cols.append(
            f"<div><h4>Step {escape(svg.fmt_num(step))} ({when}{avg})</h4>"
            + "".join(_sample_card(s) for s in shown)
            + "</div>"
        )
    note = "" if len(steps) > 1 else '<p class="note">Only one step was sampled.</p>'
    return f'<h3>Sample completions: before vs after</h3>{note}<div class="samples">{"".join(cols)}</div>'


def _pair_key(s: dict) -> str:
    return as_text(s.get("prompt", ""))


def eval_comparison(before: dict | None, before_label: str, after: dict | None, after_label: str) -> str:
    """The same eval prompts answered before and after a stage; rows whose reward changed come first."""
    a = (before or {}).get("samples") or []
    b = (after or {}).get("samples") or []
    if not a or not b:
        return ""
    by_prompt = {_pair_key(s): s for s in a}
    pairs = [(by_prompt[_pair_key(s)], s) for s in b if _pair_key(s) in by_prompt]
    if not pairs and len(a) == len(b):
        pairs = list(zip(a, b))
    if not pairs:
        return ""

    def delta(p):
        ra, rb = numeric(p[0].get("reward")), numeric(p[1].get("reward"))
        return 0.0 if ra is None or rb is None else rb - ra

    up, down = sum(delta(p) > 0 for p in pairs), sum(delta(p) < 0 for p in pairs)
    shown = sorted(pairs, key=lambda p: delta(p) == 0)[:MAX_EVAL_ROWS]
    rows = [f"<tr><th>prompt</th><th>{escape(before_label)}</th><th>{escape(after_label)}</th></tr>"]
    for x, y in shown:
        d = delta((x, y))
        cls = ' class="up"' if d > 0 else ' class="down"' if d < 0 else ""
        answer = f'<div class="note">expected: {escape(as_text(expected))}</div>' if (expected := _expected(y)) else ""
        rows.append(
            f"<tr><td><pre>{escape(_pair_key(y))}</pre>{answer}</td>"
            f"<td>{reward_badge(x.get('reward'))}<pre>{escape(as_text(x.get('completion', '')))}</pre>{_got(x)}</td>"
            f"<td{cls}>{reward_badge(y.get('reward'))}<pre>{escape(as_text(y.get('completion', '')))}</pre>"
            f"{_got(y)}</td></tr>"
        )
    return (
        f'<p class="note">{len(pairs)} eval prompts paired: {up} improved, {down} got worse, '
        f"{len(pairs) - up - down} unchanged; {len(shown)} shown, changed ones first.</p>"
        f'<table class="pairs">{"".join(rows)}</table>'
    )


# ---------------------------------------------------------------- one run


def reward_roles(config_text: str | None) -> tuple[list[str], list[str]]:
    """(metric keys of the reward components trained on, keys of the logged-only ones: weight 0), read
    from a run's config.yaml."""
    try:
        rewards = (yaml.safe_load(config_text or "") or {}).get("rewards") or []
        names = [str(r["name"]) for r in rewards]
        weights = [float(r.get("weight", 1.0)) for r in rewards]
    except (yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError):
        return [], []
    keys = component_keys(names)
    return [k for k, w in zip(keys, weights) if w != 0], [k for k, w in zip(keys, weights) if w == 0]


def _ends(points: list[tuple[float, float]]) -> tuple[float, float]:
    k = max(1, min(10, len(points) // 10))
    return sum(v for _, v in points[:k]) / k, sum(v for _, v in points[-k:]) / k


def proxy_vs_gold(run: RunData, chart_prefix: str = "") -> str:
    """An RL run trained on one reward and logging another (weight 0): both on one plot, the proxy
    rescaled to [0, 1] over its own range. A proxy that keeps rising while the gold falls is reward-model
    over-optimization (Gao et al. 2022) happening."""
    trained, gold = reward_roles(run.config_text)
    series, lines = [], []
    for k in gold:
        pts = metric_series(run.metrics, f"reward/{k}/mean")
        if pts:
            series.append(svg.Series(f"{k} (gold: logged, not trained on)", tuple(pts)))
            a, b = _ends(pts)
            lines.append(f"gold <b>{escape(k)}</b> {fmt_value(a)} → {fmt_value(b)}")
    held_out = metric_series(run.metrics, "eval_accuracy")
    if held_out and series:
        series.append(svg.Series("eval_accuracy (held-out, gold)", tuple(held_out)))
    for k in trained:
        pts = metric_series(run.metrics, f"reward/{k}/mean")
        if not pts or not series:
            continue
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        scaled = tuple((x, (v - lo) / (hi - lo) if hi > lo else 0.5) for x, v in pts)
        series.append(svg.Series(f"{k} (proxy, trained on; {fmt_value(lo)}..{fmt_value(hi)} scaled to 0..1)", scaled))
        a, b = _ends(pts)
        lines.append(f"proxy <b>{escape(k)}</b> {fmt_value(a)} → {fmt_value(b)}")
    if not series or not trained:
        return ""
    chart = svg.line_chart("Proxy reward vs gold", series, chart_id=chart_prefix + "proxy vs gold", y_range=(0.0, 1.0))
    return (
        f'<h3>Proxy reward vs gold</h3><div class="grid"><div class="card">{chart}</div><div>'
        f"<p>{'; '.join(lines)} (means of the first and last tenth of the run).</p>"
        f'<p class="note">The policy trains on the proxy; the gold is logged only (weight 0). When the proxy '
        f"keeps rising while the gold stalls or falls, the policy is exploiting the learned reward "
        f"(reward-model over-optimization, Gao et al. 2022).</p></div></div>"
    )


def run_body(run: RunData, chart_prefix: str = "") -> str:
    """Everything about one recipe run: headline numbers, curves, time split, samples, config."""
    if not run.exists:
        return f'<p class="warn">Run directory {escape(str(run.path))} not found.</p>'
    parts = [headline(run.metrics), warnings_block(run), preference_trend(run.metrics)]
    if run.metrics:
        parts.append(proxy_vs_gold(run, chart_prefix))
        main, other = charts(run.metrics, chart_prefix)
        if main:
            parts.append(
                '<h3>Training curves</h3><div class="grid">'
                + "".join(f'<div class="card">{c}</div>' for c in main)
                + "</div>"
            )
        parts.append(time_split(run.metrics, chart_prefix))
        if other:
            parts.append(
                f'<details><summary>Other metrics ({len(other)})</summary><div class="grid">'
                + "".join(f'<div class="card">{c}</div>' for c in other)
                + "</div></details>"
            )
    else:
        parts.append('<p class="note">No metrics.jsonl (or it is empty).</p>')
    parts.append(training_samples(run.samples))
    if run.problems:
        parts.append('<p class="warn">' + "<br>".join(escape(p) for p in run.problems) + "</p>")
    if run.config_text is not None:
        parts.append(
            f"<details><summary>Resolved config (config.yaml)</summary>"
            f'<pre class="config">{escape(run.config_text)}</pre></details>'
        )
    else:
        parts.append('<p class="note">No config.yaml.</p>')
    return "".join(parts)


def warnings_block(run: RunData) -> str:
    """The RL diagnostics' warnings (rl/diagnostics.py), each with its cause and a suggestion."""
    items = [
        f"<li><b>{escape(str(w.get('kind')))}</b> at step {escape(str(w.get('step')))}: "
        f"{escape(str(w.get('cause', '')))} <i>Suggestion:</i> {escape(str(w.get('suggestion', '')))}</li>"
        for w in run.warnings
    ]
    best = ""
    if run.best and numeric(run.best.get("eval_accuracy")) is not None:
        best = (
            f'<p class="note">keep_best: <code>best/</code> is the model of step {escape(str(run.best.get("step")))}'
            f" (held-out accuracy {fmt_pct(run.best['eval_accuracy'])}).</p>"
        )
    if not items:
        return best
    return f'<div class="warn"><b>{len(items)} warning(s) during training</b><ul>{"".join(items)}</ul></div>{best}'


def preference_trend(metrics: tuple[dict, ...]) -> str:
    """Preference runs: did the chosen completions' log-probability rise or fall? (DPO's known failure
    is both falling, the chosen ones too, which the margin alone hides.)"""
    c, r = metric_series(metrics, "logps/chosen"), metric_series(metrics, "logps/rejected")
    if len(c) < 2 or len(r) < 2:
        return ""
    k = max(1, min(5, len(c) // 5))
    dc = sum(v for _, v in c[-k:]) / k - sum(v for _, v in c[:k]) / k
    dr = sum(v for _, v in r[-k:]) / k - sum(v for _, v in r[:k]) / k
    text = (
        f"log-prob of the chosen completions {dc:+.2f}, of the rejected {dr:+.2f} (mean of the last {k} "
        f"step(s) minus the first {k})"
    )
    if dc < 0:
        return (
            f'<p class="warn">{escape(text)}: the chosen answers became less likely too, the known DPO failure; '
            f"an NLL term on the chosen completion (rpo_alpha) counters it.</p>"
        )
    return f'<p class="note">{escape(text)}.</p>'


def render_run(run: RunData) -> str:
    steps = [m["step"] for m in run.metrics]
    wall = max((numeric(m.get("wall_time")) or 0.0 for m in run.metrics), default=0.0)
    meta = [
        ("recipe", run.recipe or "unknown"),
        ("steps", f"{int(min(steps))}–{int(max(steps))}" if steps else "none logged"),
        ("finished", when_text(run.finished)),
        ("time", fmt_seconds(wall) if wall else "—"),
    ]
    return page(f"{run.name}", meta, "", run_body(run))


# ---------------------------------------------------------------- the page


def page(title: str, meta: list[tuple[str, str]], nav: str, body: str) -> str:
    generated = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)} — posttrain report</title><style>{CSS}</style></head><body><main>"
        f"<header><h1>{escape(title)}</h1>{meta_line(meta + [('report generated', generated)])}{nav}</header>"
        f"{body}</main></body></html>\n"
    )
