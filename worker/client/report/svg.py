"""Two small chart kinds as inline SVG: the report must open offline, with no script or CDN.

Plain SVG strings keep the report one self-contained file that any browser (or a mail client)
shows; every text that comes from data is escaped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape

WIDTH = 760
BAR_HEIGHT = 22
FONT = 'font-family="system-ui, sans-serif" font-size="12"'


def _number(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value % 1 else f"{value:.0f}"


def line_chart(points: Sequence[tuple[float, float]], title: str, unit: str, height: int = 260) -> str:
    """A filled line of (epoch seconds, value) points, with time on the x axis."""
    if not points:
        return f'<p class="empty">{escape(title)}: no data yet</p>'
    left, right, top, bottom = 64, 16, 28, 36
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    t0, t1 = points[0][0], points[-1][0]
    peak = max(value for _, value in points) or 1.0
    span = (t1 - t0) or 1.0

    def x(t: float) -> float:
        return left + (t - t0) / span * plot_w

    def y(v: float) -> float:
        return top + plot_h - v / peak * plot_h

    line = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
    area = f"{x(t0):.1f},{top + plot_h} {line} {x(t1):.1f},{top + plot_h}"
    grid = []
    for i in range(5):
        value = peak * i / 4
        gy = y(value)
        grid.append(
            f'<line x1="{left}" x2="{WIDTH - right}" y1="{gy:.1f}" y2="{gy:.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end" {FONT}>{_number(value)}</text>'
        )
    for i in range(5):
        t = t0 + span * i / 4
        label = time.strftime("%H:%M:%S", time.gmtime(t))
        grid.append(f'<text x="{x(t):.1f}" y="{height - 14}" text-anchor="middle" {FONT}>{label}</text>')
    return (
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>"
        f'<text x="{left}" y="16" {FONT} font-weight="bold">{escape(title)} ({escape(unit)})</text>'
        + "".join(grid)
        + f'<polygon points="{area}" fill="#4c78a8" fill-opacity="0.25"/>'
        f'<polyline class="series" points="{line}" fill="none" stroke="#4c78a8" stroke-width="2"/>'
        f'<text x="{WIDTH - right}" y="{height - 2}" text-anchor="end" {FONT}>UTC</text>'
        "</svg>"
    )


def bar_chart(items: Sequence[tuple[str, float]], title: str, color: str = "#4c78a8") -> str:
    """Horizontal bars, one per (label, value), largest first as given."""
    if not items:
        return f'<p class="empty">{escape(title)}: none</p>'
    label_w, value_w, top = 220, 80, 28
    bar_w = WIDTH - label_w - value_w
    peak = max(value for _, value in items) or 1.0
    height = top + BAR_HEIGHT * len(items) + 8
    rows = []
    for i, (label, value) in enumerate(items):
        y = top + i * BAR_HEIGHT
        width = max(1.0, value / peak * bar_w)
        short = label if len(label) <= 32 else label[:31] + "…"
        rows.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" {FONT}>'
            f"<title>{escape(label)}</title>{escape(short)}</text>"
            f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{BAR_HEIGHT - 6}" '
            f'fill="{color}"/>'
            f'<text x="{label_w + width + 6:.1f}" y="{y + 15}" {FONT}>{_number(value)}</text>'
        )
    return (
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>"
        f'<text x="0" y="16" {FONT} font-weight="bold">{escape(title)}</text>' + "".join(rows) + "</svg>"
    )
