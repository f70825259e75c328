"""Small inline SVG charts (no JavaScript library, nothing fetched): bars and line curves.

The output is markup built from numbers and escaped labels only, so templates may insert it as is.
"""

from __future__ import annotations

import math
from html import escape

_COLOURS = ("#1f6feb", "#d9480f", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599")


def _nice_max(v: float) -> float:
    if v <= 0 or not math.isfinite(v):
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * e >= v:
            return m * e
    return 10 * e


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def bar_chart(rows: list[tuple[str, float | None, str]], *, title: str, width: int = 560) -> str:
    """Horizontal bars: ``(label, bytes or None, note)``; a ``None`` bar shows its note instead."""
    bar_h, gap, left, top = 26, 10, 130, 34
    height = top + len(rows) * (bar_h + gap) + 10
    vmax = _nice_max(max([v for _, v, _ in rows if v] or [1]))
    span = width - left - 110
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}"><title>{escape(title)}</title>',
             f'<text x="0" y="18" class="chart-title">{escape(title)}</text>']
    for i, (label, value, note) in enumerate(rows):
        y = top + i * (bar_h + gap)
        parts.append(f'<text x="{left - 8}" y="{y + bar_h * 0.68:.1f}" text-anchor="end">{escape(label)}</text>')
        if value:
            w = max(1.0, value / vmax * span)
            colour = _COLOURS[0] if i == 0 else "#868e96"
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>')
            parts.append(f'<text x="{left + w + 6:.1f}" y="{y + bar_h * 0.68:.1f}">{escape(_fmt_bytes(value))}'
                         f'{escape(note)}</text>')
        else:
            parts.append(f'<text x="{left}" y="{y + bar_h * 0.68:.1f}" class="muted">{escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _plottable(point) -> bool:
    """Finite coordinates small enough that the axes' spans and paddings stay finite too."""
    return all(math.isfinite(v) and abs(v) <= 1e300 for v in point)


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
               width: int = 560, height: int = 260) -> str:
    """Curves ``name → [(x, y), …]`` on shared linear axes, with a legend."""
    series = {name: [p for p in s if _plottable(p)] for name, s in series.items()}
    pts = [p for s in series.values() for p in s]
    left, right, top, bottom = 64, 16, 30, 42
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}"><title>{escape(title)}</title>',
             f'<text x="0" y="18" class="chart-title">{escape(title)}</text>']
    if not pts:
        parts.append(f'<text x="{left}" y="{height / 2}" class="muted">no data yet</text></svg>')
        return "".join(parts)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ced4da"/>')
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        parts.append(f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end" class="tick">{yv:.4g}</text>')
    for xv in sorted({p[0] for p in pts})[:: max(1, len({p[0] for p in pts}) // 8)]:
        parts.append(f'<text x="{sx(xv):.1f}" y="{top + ph + 16}" text-anchor="middle" class="tick">{xv:g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    parts.append(f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
                 f'text-anchor="middle">{escape(ylabel)}</text>')
    for i, (name, s) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        if len(s) > 1:
            d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{d}"/>')
        for x, y in s:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        parts.append(f'<text x="{left + pw - 4}" y="{top + 16 + 16 * i}" text-anchor="end" fill="{colour}">'
                     f'{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
