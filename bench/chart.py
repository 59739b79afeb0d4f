"""A small SVG line-chart engine (stdlib only): ``line_chart(title, series, ...) -> str``, one inline ``<svg>``.

Each :class:`Series` is a name, (x, y) points, a colour and solid or dashed; a chart can add labelled
horizontal reference lines and vertical marks (drawn dotted, named in the legend). Axes are linear (with 0
and 1-2-5 steps) or logarithmic (1-2-5 ticks per decade, :func:`log_ticks`); values <= 0 on a log axis are
clamped to ``LOG_FLOOR`` and absurd magnitudes to ``VALUE_CAP``; None/NaN/infinite points are skipped and
long series thinned; a chart without any point says "no data". Text is escaped with :func:`esc`, which
also replaces characters XML does not allow, so the SVG always parses.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LOG_FLOOR", "VALUE_CAP", "COLORS", "Series", "line_chart", "log_ticks", "esc", "num"]

LOG_FLOOR = 1e-3  # where values <= 0 (or below it) go on a log axis
VALUE_CAP = 1e12  # larger magnitudes are drawn at this value (keeps axis arithmetic finite)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
          "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")


def num(x: Any) -> float | None:
    """A finite number as float, else None (bools, strings, NaN and infinities are not numbers)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# characters XML 1.0 (and so inline SVG) does not allow: C0 controls but tab/LF/CR, lone surrogates, U+FFFE/F
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def esc(x: Any) -> str:
    return html.escape(_NOT_XML.sub("\ufffd", str(x)), quote=True)


# ---------------------------------------------------------------- axes

@dataclass
class _Axis:
    lo: float
    hi: float
    log: bool
    start: float  # pixel of lo
    end: float  # pixel of hi
    step: float = 0.0  # linear tick step

    def pos(self, v: float) -> float:
        if self.log:
            t = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        return self.start + t * (self.end - self.start)

    def ticks(self) -> list[float]:
        if self.log:
            return log_ticks(self.lo, self.hi)
        count = int(round((self.hi - self.lo) / self.step))
        return [self.lo + i * self.step for i in range(count + 1)]


def _snap125(v: float, up: bool) -> float:
    """The nearest 1-2-5 value (…, 0.5, 1, 2, 5, 10, …) at or above (``up``) / at or below ``v`` > 0."""
    e = math.floor(math.log10(v))
    cands = [m * 10.0 ** k for k in (e - 1, e, e + 1) for m in (1, 2, 5)]
    if up:
        return min(c for c in cands if c >= v * (1 - 1e-9))
    return max(c for c in cands if c <= v * (1 + 1e-9))


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks per decade in [lo, hi]; only the decades when that gives too many ticks."""
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    marks = [(m, e) for e in range(e0, e1 + 1) for m in (1, 2, 5)
             if lo * (1 - 1e-9) <= m * 10.0 ** e <= hi * (1 + 1e-9)]
    if len(marks) > 10:
        marks = [(m, e) for m, e in marks if m == 1]
    if len(marks) > 10:
        every = math.ceil(len(marks) / 8)
        marks = marks[::every]
    return [m * 10.0 ** e for m, e in marks]


def _nice_step(raw: float) -> float:
    e = math.floor(math.log10(raw))
    return next(m * 10.0 ** e for m in (1, 2, 5, 10) if m * 10.0 ** e >= raw * (1 - 1e-9))


def _fit_axis(values: Sequence[float], log: bool, start: float, end: float) -> _Axis:
    """An axis over ``values`` (non-empty; > 0 when ``log``) with round ends; linear axes include 0."""
    lo, hi = min(values), max(values)
    if log:
        if lo == hi:
            lo, hi = lo / 2, hi * 2
        return _Axis(_snap125(lo, up=False), _snap125(hi, up=True), True, start, end)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-9:  # all zero (or all but): a unit range
        hi = lo + 1.0
    step = _nice_step((hi - lo) / 5)
    lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return _Axis(lo, hi, False, start, end, step)


def _tick_label(v: float) -> str:
    return "0" if abs(v) < 1e-12 else f"{round(v, 10):g}"


# ---------------------------------------------------------------- drawing

@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    color: str
    dashed: bool = False


_W, _H = 660, 330
_ML, _MR, _MT, _MB = 64, 176, 34, 48  # margins: the legend sits in the right one
_X0, _X1, _Y0, _Y1 = _ML, _W - _MR, _H - _MB, _MT  # plot area: left, right, bottom, top
_MAX_POINTS = 400  # per series; longer ones (a CDF) are thinned evenly
_MARKERS_UP_TO = 40  # points per series that still get a dot each


def _clamp(v: float, log: bool) -> float:
    """Into what an axis can show: [LOG_FLOOR, VALUE_CAP] on a log axis, ±VALUE_CAP on a linear one."""
    return min(max(v, LOG_FLOOR if log else -VALUE_CAP), VALUE_CAP)


def _clean(points: Any, x_log: bool, y_log: bool) -> list[tuple[float, float]]:
    """Finite (x, y) pairs sorted by x, clamped for log axes, thinned to ``_MAX_POINTS``."""
    out = []
    for p in points if isinstance(points, (list, tuple)) else ():
        if isinstance(p, (list, tuple)) and len(p) >= 2:
            x, y = num(p[0]), num(p[1])
            if x is not None and y is not None:
                out.append((_clamp(x, x_log), _clamp(y, y_log)))
    out.sort(key=lambda p: p[0])
    if len(out) > _MAX_POINTS:
        every = math.ceil(len(out) / _MAX_POINTS)
        out = out[::every] + ([out[-1]] if (len(out) - 1) % every else [])
    return out


def _svg_open(title: str) -> str:
    t = esc(title)
    return (f'<svg class="chart" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img" font-family="sans-serif" '
            f'aria-label="{t}"><title>{t}</title>'
            f'<rect x="0" y="0" width="{_W}" height="{_H}" fill="#ffffff"/>'
            f'<text x="{_W / 2:.0f}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{t}</text>')


def _no_data_chart(title: str) -> str:
    return (_svg_open(title)
            + f'<rect x="{_X0}" y="{_Y1}" width="{_X1 - _X0}" height="{_Y0 - _Y1}" fill="none" stroke="#bbbbbb"/>'
            + f'<text x="{(_X0 + _X1) / 2:.0f}" y="{(_Y0 + _Y1) / 2:.0f}" text-anchor="middle" font-size="14" '
              'fill="#888888">no data</text></svg>')


def _x_axis(ax: _Axis, label: str) -> str:
    out = []
    for t in ax.ticks():
        x = ax.pos(t)
        out.append(f'<line x1="{x:.1f}" y1="{_Y1}" x2="{x:.1f}" y2="{_Y0}" stroke="#eeeeee"/>'
                   f'<line x1="{x:.1f}" y1="{_Y0}" x2="{x:.1f}" y2="{_Y0 + 4}" stroke="#333333"/>'
                   f'<text x="{x:.1f}" y="{_Y0 + 16}" text-anchor="middle" font-size="11">{_tick_label(t)}</text>')
    out.append(f'<text x="{(_X0 + _X1) / 2:.0f}" y="{_H - 10}" text-anchor="middle" font-size="12">'
               f'{esc(label)}</text>')
    return "".join(out)


def _y_axis(ax: _Axis, label: str) -> str:
    out = []
    for t in ax.ticks():
        y = ax.pos(t)
        out.append(f'<line x1="{_X0}" y1="{y:.1f}" x2="{_X1}" y2="{y:.1f}" stroke="#eeeeee"/>'
                   f'<line x1="{_X0 - 4}" y1="{y:.1f}" x2="{_X0}" y2="{y:.1f}" stroke="#333333"/>'
                   f'<text x="{_X0 - 7}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_tick_label(t)}</text>')
    cy = (_Y0 + _Y1) / 2
    out.append(f'<text x="14" y="{cy:.0f}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 14 {cy:.0f})">{esc(label)}</text>')
    return "".join(out)


_DASHED, _DOTTED = "6 4", "2 3"  # p50 and reference lines; knee marks


def _dash(pattern: str) -> str:
    return f' stroke-dasharray="{pattern}"' if pattern else ""


def _series_svg(s: Series, xa: _Axis, ya: _Axis) -> str:
    xy = [(xa.pos(x), ya.pos(y)) for x, y in s.points]
    out = []
    if len(xy) > 1:
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        dash = _dash(_DASHED if s.dashed else "")
        out.append(f'<polyline fill="none" stroke="{s.color}" stroke-width="2"{dash} points="{pts}"/>')
    if len(xy) <= _MARKERS_UP_TO:
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{s.color}"/>' for x, y in xy]
    return "".join(out)


def _legend(entries: Sequence[tuple[str, str, str]]) -> str:
    """(name, colour, dash pattern) rows right of the plot; what does not fit is counted."""
    rows = (_Y0 - _Y1) // 16
    shown = entries if len(entries) <= rows else entries[: rows - 1]
    x = _X1 + 14
    out = []
    for i, (name, color, pattern) in enumerate(shown):
        y = _Y1 + 10 + 16 * i
        name = name if len(name) <= 24 else name[:23] + "…"
        out.append(f'<line x1="{x}" y1="{y}" x2="{x + 22}" y2="{y}" stroke="{color}" stroke-width="2"'
                   f'{_dash(pattern)}/><text x="{x + 28}" y="{y + 4}" font-size="11">{esc(name)}</text>')
    if len(shown) < len(entries):
        y = _Y1 + 10 + 16 * len(shown)
        out.append(f'<text x="{x}" y="{y + 4}" font-size="11">+{len(entries) - len(shown)} more</text>')
    return "".join(out)


def _hline_svg(y_val: float, label: str, ya: _Axis) -> str:
    """A dashed reference line across the plot, labelled at its left end (where latencies are low)."""
    y = ya.pos(y_val)
    text_y = y + 14 if y - _Y1 < 16 else y - 5  # below the line when it runs along the top
    return (f'<line x1="{_X0}" y1="{y:.1f}" x2="{_X1}" y2="{y:.1f}" stroke="#555555" stroke-width="1.5"'
            f'{_dash(_DASHED)}/><text x="{_X0 + 5}" y="{text_y:.1f}" font-size="11" '
            f'fill="#555555">{esc(label)}</text>')


def _vline_svg(x_val: float, color: str, xa: _Axis) -> str:
    """A dotted vertical mark (a knee); its label goes into the legend so marks close together stay legible."""
    x = xa.pos(x_val)
    return (f'<line x1="{x:.1f}" y1="{_Y1}" x2="{x:.1f}" y2="{_Y0}" stroke="{color}" stroke-width="1.5"'
            f'{_dash(_DOTTED)}/>')


def line_chart(title: str, series: Sequence[Series], *, x_label: str, y_label: str,
                x_log: bool = True, y_log: bool = True, y_span: tuple[float, float] | None = None,
                hlines: Sequence[tuple[float, str]] = (),
                vlines: Sequence[tuple[float, str, str]] = ()) -> str:
    """An SVG line chart. ``hlines``: (y, label) reference lines; ``vlines``: (x, label, colour) marks;
    ``y_span``: a range the y axis always covers (e.g. (0, 1) for a CDF)."""
    series = [Series(s.name, _clean(s.points, x_log, y_log), s.color, s.dashed) for s in series]
    series = [s for s in series if s.points]
    if not series:
        return _no_data_chart(title)
    hlines = [(_clamp(v, y_log), label) for y, label in hlines if (v := num(y)) is not None]
    vlines = [(_clamp(v, x_log), label, c) for x, label, c in vlines if (v := num(x)) is not None]
    xs = [x for s in series for x, _ in s.points] + [x for x, _, _ in vlines]
    ys = [y for s in series for _, y in s.points] + [y for y, _ in hlines] + list(y_span or ())
    xa = _fit_axis(xs, x_log, _X0, _X1)
    ya = _fit_axis(ys, y_log, _Y0, _Y1)
    legend = [(s.name, s.color, _DASHED if s.dashed else "") for s in series]
    legend += [(label, c, _DOTTED) for _, label, c in vlines]
    parts = [_svg_open(title), _x_axis(xa, x_label), _y_axis(ya, y_label),
             f'<rect x="{_X0}" y="{_Y1}" width="{_X1 - _X0}" height="{_Y0 - _Y1}" fill="none" stroke="#999999"/>']
    parts += [_hline_svg(y, label, ya) for y, label in hlines]
    parts += [_vline_svg(x, c, xa) for x, _, c in vlines]
    parts += [_series_svg(s, xa, ya) for s in series]
    parts += [_legend(legend), "</svg>"]
    return "".join(parts)
