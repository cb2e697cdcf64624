"""Charts as server-side SVG (pure: numbers in, markup out): no library, no script, no CDN.

Labels are escaped; colours and sizes are presentation attributes, so the portal's
Content-Security-Policy (no inline styles) holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from markupsafe import Markup, escape

PALETTE = ("#2f5bd3", "#f08c2e", "#2aa876", "#b04fc4", "#d64545", "#6b7a90")
WIDTH, HEIGHT = 720, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 36, 40


def nice_max(value: float) -> float:
    """The axis top: 1, 2 or 5 times a power of ten, at least ``value``."""
    if value <= 0:
        return 1
    power = 1.0
    while power * 10 <= value:
        power *= 10
    while power > value:
        power /= 10
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def short(value: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:g}"


def stacked_bars(title: str, labels: Sequence[str], series: Mapping[str, Sequence[float]],
                 chart_id: str = "") -> Markup:
    """Vertical bars, one per label (e.g. a day), stacked by series (e.g. token class)."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    top = nice_max(max(totals, default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(labels), 1)
    bar = max(slot * 0.7, 1)
    parts = [_open(title, chart_id), *_y_axis(top, plot_h)]
    every = max(1, round(len(labels) / 12))
    for i, label in enumerate(labels):
        x = LEFT + i * slot + (slot - bar) / 2
        y = TOP + plot_h
        for n, (name, values) in enumerate(series.items()):
            if values[i] <= 0:
                continue
            h = values[i] / top * plot_h
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                         f'fill="{PALETTE[n % len(PALETTE)]}"><title>{escape(label)} '
                         f'{escape(name)}: {values[i]:,.0f}</title></rect>')
        if i % every == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{TOP + plot_h + 16}" font-size="10" '
                         f'text-anchor="middle" fill="#5b6475">{escape(label[-5:])}</text>')
    parts += _legend(list(series))
    parts.append("</svg>")
    return Markup("".join(parts))


def horizontal_bars(title: str, items: Sequence[tuple[str, float]],
                    chart_id: str = "") -> Markup:
    """One bar per item (e.g. tokens per model), largest first."""
    items = sorted(items, key=lambda item: -item[1])[:12]
    top = nice_max(max((v for _, v in items), default=0))
    row = 26
    height = TOP + row * max(len(items), 1) + 12
    label_w, plot_w = 150, 360 - 150 - 60
    parts = [_open(title, chart_id, 360, height)]
    for i, (label, value) in enumerate(items):
        y = TOP + i * row
        w = value / top * plot_w
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" font-size="11" text-anchor="end" '
                     f'fill="#1d2330">{escape(label[:22])}</text>'
                     f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="16" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"><title>{escape(label)}: '
                     f'{value:,.0f}</title></rect>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 16}" font-size="11" '
                     f'fill="#5b6475">{short(value)}</text>')
    if not items:
        parts.append(f'<text x="180" y="{TOP + 16}" font-size="12" text-anchor="middle" '
                     f'fill="#5b6475">no usage</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _open(title: str, chart_id: str, width: int = WIDTH, height: int = HEIGHT) -> str:
    ident = f' id="{escape(chart_id)}"' if chart_id else ""
    return (f'<svg{ident} xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>'
            f'<text x="12" y="22" font-size="14" font-weight="600" fill="#1d2330">'
            f'{escape(title)}</text>')


def _y_axis(top: float, plot_h: float) -> list[str]:
    parts = []
    for step in range(5):
        value = top * step / 4
        y = TOP + plot_h - plot_h * step / 4
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#e3e6ec"/><text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="10" '
                     f'text-anchor="end" fill="#5b6475">{short(value)}</text>')
    return parts


def _legend(names: list[str]) -> list[str]:
    parts, x = [], WIDTH - RIGHT
    for n, name in reversed(list(enumerate(names))):
        x -= 14 + 7 * len(name)
        parts.append(f'<rect x="{x}" y="10" width="10" height="10" '
                     f'fill="{PALETTE[n % len(PALETTE)]}"/><text x="{x + 14}" y="19" '
                     f'font-size="11" fill="#1d2330">{escape(name)}</text>')
    return parts
