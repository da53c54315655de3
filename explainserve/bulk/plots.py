"""Summary plots of a bulk run as inline SVG (no scripts, no external files)."""

from __future__ import annotations

from html import escape
from typing import Sequence

import numpy as np

WIDTH, HEIGHT = 320, 160
MARGIN = 28
# Verdict keys of the report's cards, their colours and how they are written.
VERDICT_COLOURS = {"NORMAL": "#2c7fb8", "ANOMALOUS": "#d7301f", "NONE": "#969696", "ERROR": "#252525"}
VERDICT_NAMES = {"NORMAL": "normal", "ANOMALOUS": "anomalous", "NONE": "no verdict", "ERROR": "error"}
BAR_COLOUR = "#6a51a3"


def svg(title: str, body: str, plot_id: str) -> str:
    return (f'<svg id="{plot_id}" class="plot" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">'
            f'<text x="4" y="14" font-size="12" font-weight="bold">{escape(title)}</text>{body}</svg>')


def verdict_rate(counts: dict[str, int], plot_id: str = "plot-verdicts") -> str:
    """Horizontal bars: the share of inputs per verdict key (NORMAL, ANOMALOUS, NONE, ERROR)."""
    total = max(1, sum(counts.values()))
    rows = []
    for n, (name, colour) in enumerate(VERDICT_COLOURS.items()):
        count = counts.get(name, 0)
        y = 24 + n * 32
        width = (WIDTH - 150) * count / total
        rows.append(f'<text x="4" y="{y + 15}" font-size="11">{VERDICT_NAMES[name]}</text>'
                    f'<rect class="bar" data-verdict="{name}" x="90" y="{y}" width="{width:.1f}" height="20" fill="{colour}"/>'
                    f'<text x="{94 + width:.1f}" y="{y + 15}" font-size="11">{count} ({100 * count / total:.1f} %)</text>')
    return svg("verdict rate", "".join(rows), plot_id)


def histogram(values: Sequence[float], title: str, unit: str, plot_id: str, bins: int = 20) -> str:
    """Bars of a histogram of ``values`` with its range written under the axis."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return svg(title, '<text x="4" y="40" font-size="11">no values</text>', plot_id)
    counts, edges = np.histogram(values, bins=bins)
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN - 4
    bar_w = plot_w / bins
    bars = "".join(
        f'<rect class="bar" x="{MARGIN + i * bar_w:.1f}" y="{MARGIN + 4 + plot_h * (1 - c / counts.max()):.1f}" '
        f'width="{max(bar_w - 1, 1):.1f}" height="{plot_h * c / counts.max():.1f}" fill="{BAR_COLOUR}">'
        f'<title>{edges[i]:.3g} to {edges[i + 1]:.3g}: {c}</title></rect>'
        for i, c in enumerate(counts) if c)
    axis = (f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#000"/>'
            f'<text x="{MARGIN}" y="{HEIGHT - 10}" font-size="10">{edges[0]:.3g}</text>'
            f'<text x="{WIDTH - MARGIN}" y="{HEIGHT - 10}" font-size="10" text-anchor="end">{edges[-1]:.3g} {unit}</text>'
            f'<text x="{WIDTH - 4}" y="14" font-size="10" text-anchor="end">n={values.size}, max count {counts.max()}</text>')
    return svg(title, bars + axis, plot_id)
