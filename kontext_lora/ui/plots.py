"""Loss curves as inline SVG, drawn from metrics.jsonl on each request.

Written out by hand rather than with matplotlib (which the sweep summary uses for its PNG): the run page redraws
its curves every second while a run trains, and a matplotlib figure costs about half a second of CPU each time,
which a training run on the same cores would lose. A polyline per series with labelled axes is all this needs.
"""

from __future__ import annotations

import math
from html import escape

COLOURS = ("#2d5bd7", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#1098ad")


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    """About `count` round numbers spanning [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}"


def curves_svg(series: dict[str, list[tuple[int, float]]], width: int = 560, height: int = 220) -> str:
    """One line per named series of (step, value) points (dots for short ones); '' when no series has a point."""
    series = {name: [(s, v) for s, v in points if math.isfinite(v)] for name, points in series.items()}
    series = {name: points for name, points in series.items() if points}
    if not series:
        return ""
    left, right, top, bottom = 56, 12, 10, 30
    steps = [s for points in series.values() for s, _ in points]
    values = [v for points in series.values() for _, v in points]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-6, y1 + abs(y1) * 0.1 + 1e-6
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def x(step: float) -> float:
        return left + (step - x0) / (x1 - x0) * (width - left - right)

    def y(value: float) -> float:
        return top + (y1 - value) / (y1 - y0) * (height - top - bottom)

    def text(px: float, py: float, label: str, anchor: str = "end", extra: str = "") -> str:
        return f'<text x="{px:.1f}" y="{py:.1f}" text-anchor="{anchor}" font-size="11" {extra}>{escape(label)}</text>'

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" class="curve" role="img">']
    for tick in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#e2e5ea"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="11">{_label(tick)}</text>'
        )
    for tick in _ticks(x0, x1, 6):
        if tick == int(tick):
            parts.append(text(x(tick), height - bottom + 16, str(int(tick)), "middle"))
    parts.append(text(width - right, height - 2, "step", extra='fill="#6b7280"'))
    for index, (name, points) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        if len(points) <= 40:
            parts += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>' for s, v in points]
        parts.append(
            f'<text x="{width - right - 4}" y="{top + 14 + 14 * index}" text-anchor="end" font-size="12" '
            f'fill="{colour}">{escape(name)} (last {_label(points[-1][1])})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
