"""Hand-written inline SVG charts: line charts (with bands), a stacked area, a bar chart with CI whiskers.

Plain strings, no plotting library: the report stays one text file that opens offline, the charts stay sharp at
any zoom, and the tests can count and read them. Every label is HTML-escaped here, so callers pass raw text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569")
FONT = "font-family=\"system-ui,-apple-system,'Segoe UI',Roboto,sans-serif\""
MAX_POINTS = 800  # longer series are reduced to per-bucket min and max, which keeps spikes visible
MARKER_POINTS = 40  # series this short (eval points, short runs) get a dot per point
SMOOTH_POINTS = 150  # longer series also get a line of means over buckets of steps
CHAR_W = 6.6  # rough width of one 11px character, for laying out labels without a font engine


@dataclass(frozen=True)
class Series:
    label: str
    points: tuple[tuple[float, float], ...]  # (step, value), sorted by step
    band: tuple[tuple[float, float, float], ...] = ()  # (step, low, high): a shaded range around the line


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    mag = 10 ** math.floor(math.log10((hi - lo) / max(1, target)))

    def count(step: float) -> int:
        return math.floor(hi / step + 1e-9) - math.ceil(lo / step - 1e-9) + 1

    # the step whose tick count is nearest target + 1; on a tie the coarser one
    step = min((m * mag for m in (10, 5, 2.5, 2, 1)), key=lambda st: abs(count(st) - target - 1))
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t = first + len(ticks) * step
    return ticks


def fmt_num(v: float, spread: float | None = None) -> str:
    """Short label for an axis tick or a value; ``spread`` (tick step) picks the number of decimals."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4:
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if a >= div:
                return f"{v / div:.3g}{suffix}"
    if a >= 100 and (spread is None or spread >= 1):
        return f"{v:.0f}"
    if a < 1e-3:
        return f"{v:.1e}".replace("e-0", "e-")
    if spread is not None and spread > 0:
        decimals = max(0, min(6, -math.floor(math.log10(spread) + 1e-9)))
        if spread * 10**decimals % 1 > 1e-6:  # a step like 2.5 needs one more digit
            decimals += 1
        return f"{v:.{decimals}f}"
    return f"{v:.3g}"


def _downsample(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    size = math.ceil(len(points) / (MAX_POINTS // 2))
    out: list[tuple[float, float]] = []
    for i in range(0, len(points), size):
        chunk = points[i : i + size]
        lo, hi = min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])
        out.extend(sorted({lo, hi}))
    return out


class _Frame:
    """Maps data coordinates to pixels and draws the axes, grid and title."""

    def __init__(
        self,
        width: int,
        height: int,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        top: int,
        bottom: int = 34,
        left: int = 54,
        right: int = 18,
    ):
        self.w, self.h, self.top, self.bottom, self.left, self.right = width, height, top, bottom, left, right
        (x0, x1), (y0, y1) = x_range, y_range
        if x1 <= x0:
            x0, x1 = x0 - 0.5, x1 + 0.5
        if y1 <= y0:
            pad = abs(y0) * 0.05 or 0.5
            y0, y1 = y0 - pad, y1 + pad
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)

    def py(self, y: float) -> float:
        return self.h - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.h - self.top - self.bottom)

    def axes(self, x_label: str, y_ticks: list[float], x_ticks: list[float] | None, y_fmt=None) -> list[str]:
        out = []
        spread = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else None
        for t in y_ticks:
            y = self.py(t)
            out.append(
                f'<line x1="{self.left}" x2="{self.w - self.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
            )
            label = y_fmt(t) if y_fmt else fmt_num(t, spread)
            out.append(
                f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
                f'fill="#6b7280">{escape(label)}</text>'
            )
        base = self.h - self.bottom
        out.append(f'<line x1="{self.left}" x2="{self.w - self.right}" y1="{base}" y2="{base}" stroke="#9ca3af"/>')
        if x_ticks is not None:
            xs = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else None
            for t in x_ticks:
                x = self.px(t)
                out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}" stroke="#9ca3af"/>')
                out.append(
                    f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle" font-size="11" '
                    f'fill="#6b7280">{escape(fmt_num(t, xs))}</text>'
                )
            out.append(
                f'<text x="{self.w - self.right}" y="{self.h - 4}" text-anchor="end" font-size="11" '
                f'fill="#6b7280">{escape(x_label)}</text>'
            )
        return out


def _legend(labels: list[str], width: int, y: int) -> tuple[list[str], int]:
    """Legend entries left to right, wrapping; returns the elements and the y below the last row."""
    out, x = [], 10
    for i, label in enumerate(labels):
        w = 22 + CHAR_W * len(label)
        if x + w > width - 6 and x > 10:
            x, y = 10, y + 16
        color = PALETTE[i % len(PALETTE)]
        out.append(f'<rect x="{x}" y="{y - 8}" width="12" height="4" rx="1" fill="{color}"/>')
        out.append(f'<text x="{x + 16}" y="{y - 2}" font-size="11" fill="#374151">{escape(label)}</text>')
        x += w + 10
    return out, y + 8


def _open(title: str, width: int, height: int, chart_id: str, fluid: bool = True) -> str:
    size = 'width="100%"' if fluid else f'width="{width}" height="{height}"'
    return (
        f'<svg class="chart" data-chart="{escape(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" {size} role="img" aria-label="{escape(title)}" {FONT}>'
        f"<title>{escape(title)}</title>"
        f'<text x="10" y="17" font-size="13" font-weight="600" fill="#111827">{escape(title)}</text>'
    )


def _header(title: str, labels: list[str], width: int, chart_id: str, height: int) -> tuple[list[str], int]:
    parts = [_open(title, width, height, chart_id)]
    if len(labels) > 1:
        legend, top = _legend(labels, width, 36)
        parts += legend
        return parts, top + 6
    return parts, 30


def line_chart(
    title: str,
    series: list[Series],
    *,
    chart_id: str | None = None,
    x_label: str = "step",
    y_range: tuple[float | None, float | None] = (None, None),
    width: int = 400,
    height: int = 240,
) -> str:
    """A line per series; a series' ``band`` is shaded under its line. ``y_range`` pins either end."""
    series = [s for s in series if s.points]
    xs = [p[0] for s in series for p in s.points]
    ys = [p[1] for s in series for p in s.points] + [v for s in series for b in s.band for v in b[1:]]
    lo, hi = min(ys), max(ys)
    lo = y_range[0] if y_range[0] is not None else lo
    hi = y_range[1] if y_range[1] is not None else hi
    pad = (hi - lo) * 0.05 if hi > lo else abs(hi) * 0.05 or 0.5
    lo = lo - pad if y_range[0] is None else lo
    hi = hi + pad if y_range[1] is None else hi
    y_ticks = nice_ticks(lo, hi)
    if y_range[0] is None and y_ticks:
        lo = min(lo, y_ticks[0])
    if y_range[1] is None and y_ticks:
        hi = max(hi, y_ticks[-1])
    parts, top = _header(title, [s.label for s in series], width, chart_id or title, height)
    f = _Frame(width, height, (min(xs), max(xs)), (lo, hi), top=top)
    x_ticks = [t for t in nice_ticks(f.x0, f.x1, 6) if t == int(t)] if max(xs) > min(xs) else [xs[0]]
    parts += f.axes(x_label, [t for t in y_ticks if f.y0 - 1e-12 <= t <= f.y1 + 1e-12], x_ticks)
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        if s.band:
            upper = " ".join(f"{f.px(x):.1f},{f.py(h):.1f}" for x, _, h in s.band)
            lower = " ".join(f"{f.px(x):.1f},{f.py(lo):.1f}" for x, lo, _ in reversed(s.band))
            parts.append(
                f'<polygon points="{upper} {lower}" fill="{color}" fill-opacity="0.15" stroke="none">'
                f"<title>{escape(s.label)} range</title></polygon>"
            )
        pts = _downsample(list(s.points))
        path = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in pts)
        long = len(s.points) > SMOOTH_POINTS
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="{1.2 if long else 1.8}" '
            f'stroke-opacity="{0.3 if long else 1}" stroke-linejoin="round">'
            f"<title>{escape(s.label)}</title></polyline>"
        )
        if long:  # noisy long runs: the raw line faint, its bucket means on top
            size = math.ceil(len(s.points) / SMOOTH_POINTS)
            means = [
                (sum(p[0] for p in c) / len(c), sum(p[1] for p in c) / len(c))
                for c in (s.points[i : i + size] for i in range(0, len(s.points), size))
            ]
            path = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in means)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" '
                f'stroke-linejoin="round"><title>{escape(s.label)}: mean over {size} steps'
                f"</title></polyline>"
            )
        if len(s.points) <= MARKER_POINTS:
            for x, y in s.points:
                parts.append(
                    f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="2.6" fill="{color}">'
                    f"<title>{escape(s.label)} @ step {fmt_num(x)}: {fmt_num(y)}</title></circle>"
                )
    parts.append("</svg>")
    return "".join(parts)


def stacked_area(
    title: str,
    steps: list[float],
    layers: list[tuple[str, list[float]]],
    *,
    chart_id: str | None = None,
    width: int = 400,
    height: int = 240,
) -> str:
    """Layers stacked bottom-up at each step (e.g. seconds per phase of a training step)."""
    parts, top = _header(title, [name for name, _ in layers], width, chart_id or title, height)
    totals = [sum(vals[i] for _, vals in layers) for i in range(len(steps))]
    y_ticks = nice_ticks(0.0, max(totals) if totals else 1.0)
    f = _Frame(width, height, (min(steps), max(steps)), (0.0, max([*y_ticks, *totals, 1e-9])), top=top)
    parts += f.axes("step", y_ticks, [t for t in nice_ticks(f.x0, f.x1, 6) if t == int(t)])
    below = [0.0] * len(steps)
    for i, (name, vals) in enumerate(layers):
        above = [b + v for b, v in zip(below, vals)]
        upper = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in zip(steps, above))
        lower = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in reversed(list(zip(steps, below))))
        parts.append(
            f'<polygon points="{upper} {lower}" fill="{PALETTE[i % len(PALETTE)]}" fill-opacity="0.75" '
            f'stroke="none"><title>{escape(name)}</title></polygon>'
        )
        below = above
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class Bar:
    label: str
    value: float | None
    ci: tuple[float, float] | None = None
    kind: str = "stage"  # "baseline", "stage" or "control": picks the colour


_BAR_COLORS = {"baseline": "#9ca3af", "stage": "#2563eb", "control": "#f59e0b"}


def _wrap(label: str, room: float) -> list[str] | None:
    """The label on one line, or broken at the space / underscore nearest its middle onto two; None if too long."""
    if len(label) * CHAR_W <= room:
        return [label]
    cuts = sorted((abs(i - len(label) / 2), i) for i, c in enumerate(label) if c in " _-/")
    for _, i in cuts[:1]:
        lines = [label[: i + 1].rstrip(), label[i + 1 :]]
        if max(len(x) for x in lines) * CHAR_W <= room:
            return lines
    return None


def bar_chart(title: str, bars: list[Bar], *, chart_id: str | None = None, plot_height: int = 220) -> str:
    """Fractions in [0, 1] as percentage bars with confidence-interval whiskers; None draws an empty slot."""
    n = max(1, len(bars))
    width = max(480, min(1100, 120 * n + 70))
    slot = (width - 54 - 18) / n
    labels = [b.label if len(b.label) <= 28 else b.label[:27] + "…" for b in bars]
    wrapped = [_wrap(lb, slot - 8) for lb in labels]
    rotate = any(w is None for w in wrapped)
    longest = max((len(lb) for lb in labels), default=0) * CHAR_W
    bottom = int(26 + longest * 0.5) if rotate else 12 + 14 * max(len(w) for w in wrapped)
    height = 34 + plot_height + bottom
    parts = [_open(title, width, height, chart_id or title, fluid=False)]
    kinds = [k for k in ("baseline", "stage", "control") if any(b.kind == k for b in bars)]
    if len(kinds) > 1:
        x = width - 18
        for k in reversed(kinds):
            x -= 16 + CHAR_W * len(k) + 12
            parts.append(
                f'<rect x="{x:.0f}" y="8" width="11" height="11" rx="2" fill="{_BAR_COLORS[k]}"/>'
                f'<text x="{x + 15:.0f}" y="17" font-size="11" fill="#374151">{k}</text>'
            )
    f = _Frame(width, height, (0.0, float(n)), (0.0, 1.0), top=34, bottom=bottom)
    parts += f.axes("", nice_ticks(0.0, 1.0), None, y_fmt=lambda t: f"{100 * t:.0f}%")
    bw = min(64.0, slot * 0.6)
    for i, b in enumerate(bars):
        cx = f.px(i + 0.5)
        ly = f.h - f.bottom + 16
        if rotate:
            parts.append(
                f'<text x="{cx + 4:.1f}" y="{ly:.1f}" font-size="11" fill="#374151" text-anchor="end" '
                f'transform="rotate(-30 {cx + 4:.1f} {ly:.1f})">{escape(labels[i])}'
                f"<title>{escape(b.label)}</title></text>"
            )
        else:
            spans = "".join(
                f'<tspan x="{cx:.1f}" dy="{0 if j == 0 else 14}">{escape(line)}</tspan>'
                for j, line in enumerate(wrapped[i])
            )
            parts.append(
                f'<text y="{ly:.1f}" font-size="11" fill="#374151" text-anchor="middle">{spans}'
                f"<title>{escape(b.label)}</title></text>"
            )
        if b.value is None:
            parts.append(
                f'<text x="{cx:.1f}" y="{f.py(0) - 6:.1f}" font-size="11" text-anchor="middle" '
                f'fill="#9ca3af">n/a</text>'
            )
            continue
        y = f.py(b.value)
        tip = f"{b.label}: {100 * b.value:.1f}%" + (f" [{100 * b.ci[0]:.1f}, {100 * b.ci[1]:.1f}]" if b.ci else "")
        parts.append(
            f'<rect x="{cx - bw / 2:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{f.py(0) - y:.1f}" '
            f'rx="2" fill="{_BAR_COLORS.get(b.kind, PALETTE[0])}"><title>{escape(tip)}</title></rect>'
        )
        top_y = y
        if b.ci:
            y_lo, y_hi = f.py(b.ci[0]), f.py(b.ci[1])
            top_y = min(y, y_hi)
            parts.append(
                f'<path d="M{cx:.1f},{y_lo:.1f}V{y_hi:.1f}M{cx - 6:.1f},{y_lo:.1f}h12'
                f'M{cx - 6:.1f},{y_hi:.1f}h12" stroke="#111827" stroke-width="1.3" fill="none"/>'
            )
        parts.append(
            f'<text x="{cx:.1f}" y="{top_y - 5:.1f}" font-size="11" text-anchor="middle" '
            f'font-weight="600" fill="#111827">{100 * b.value:.1f}%</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
