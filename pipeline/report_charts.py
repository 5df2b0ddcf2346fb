"""SVG charts of the report, drawn as strings: per-class accuracy bars, the 2-D projection of real
vs synthesized features (PCA) and training curves. Inline SVG, nothing fetched."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")  # Tableau 10: one per method
# Classes in the projection take other colours than methods do elsewhere (ColorBrewer Dark2 and
# Set1), so a colour never means a method in one chart and a class in the next.
CLASS_PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
                 "#666666", "#377eb8", "#984ea3")
OTHER = "#6b6b6b"  # a curve that is not a method's (the SHIP generator's)
DASHES = ("", "6 3", "2 3", "8 3 2 3")  # seeds within one panel
DASH_GLYPHS = ("\u2014", "- -", "\u00b7\u00b7\u00b7", "-\u00b7-")  # how each reads in a key
MAX_POINTS = 200  # drawn per class and kind in the projection; the PCA itself uses every point


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def finite(v: Any) -> bool:
    return v is not None and math.isfinite(float(v))


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `x` (N, D) on their first two principal axes: (N, 2), and the variance share of each.
    Signs are fixed (largest loading positive) so the picture is deterministic."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)  # xc = U S Vt; rows of Vt are the axes (k, D)
    k = min(2, vt.shape[0])
    axes = vt[:k] * np.sign(vt[:k, [np.argmax(np.abs(vt[i])) for i in range(k)]].diagonal())[:, None]
    out = np.zeros((x.shape[0], 2))
    out[:, :k] = xc @ axes.T  # (N, D) @ (D, k) -> (N, k)
    total = float((s**2).sum())
    share = np.zeros(2)
    share[:k] = s[:k] ** 2 / total if total > 0 else 0.0
    return out, share


# ---- validation ----------------------------------------------------------------------------------

def _ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About n round values (1, 2, 2.5 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(round(step)))
    start, stop = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [start + i * step for i in range(round((stop - start) / step) + 1)]


def _tick_text(v: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    digits = next((d for d in range(7) if abs(round(step, d) - step) <= 1e-9 * max(1.0, abs(step))),
                  None)
    if digits is None:  # a step below 1e-6: fixed decimals would be unreadable
        return f"{v:.3g}"
    text = f"{v:.{digits}f}"
    return text[1:] if float(text) == 0 and text.startswith("-") else text


def _svg(width: float, height: float, inner: list[str], label: str) -> str:
    return (f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'role="img" aria-label="{esc(label)}">' + "".join(inner) + "</svg>")


def _frame(box: tuple[float, float, float, float], xt: list[float], yt: list[float], fx: Any, fy: Any,
           xlabel: str, ylabel: str) -> list[str]:
    """Grid lines, tick labels, axes and axis titles of the plot area box = (x0, y0, w, h)."""
    x0, y0, w, h = box
    out = []
    for t in yt:
        y = fy(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#e6e8eb"/>'
                   f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_text(t, yt)}</text>')
    for t in xt:
        x = fx(t)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + h}" stroke="#f0f1f3"/>'
                   f'<text x="{x:.1f}" y="{y0 + h + 15}" text-anchor="middle">{_tick_text(t, xt)}</text>')
    out.append(f'<path d="M{x0} {y0}V{y0 + h}H{x0 + w}" fill="none" stroke="#888"/>')
    if xlabel:
        out.append(f'<text x="{x0 + w / 2:.1f}" y="{y0 + h + 32}" text-anchor="middle">{esc(xlabel)}</text>')
    if ylabel:
        out.append(f'<text transform="translate({x0 - 40},{y0 + h / 2:.1f}) rotate(-90)" '
                   f'text-anchor="middle">{esc(ylabel)}</text>')
    return out


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def method_colours(methods: list[str]) -> dict[str, str]:
    """Each method's colour, the same in every chart of a report: by its place in the table."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(dict.fromkeys(methods))}


def bars(per_class: Mapping[str, Mapping[str, Any]], colours: Mapping[str, str] | None = None,
         sides: Mapping[str, list[str]] | None = None) -> str:
    """Grouped bars: one group per class name, one bar per method, base classes then new ones
    (each side labelled) when `sides` says which is which; scrolls sideways when long."""
    methods = list(per_class)
    colours = {**method_colours(methods), **(colours or {})}
    classes = list(dict.fromkeys(c for m in methods for c in per_class[m]))
    side_of = {c: side for side in ("base", "new") for c in (sides or {}).get(side, [])}
    if side_of:  # base first, then new, each in the table's order
        classes.sort(key=lambda c: ("base", "new").index(side_of[c]) if c in side_of else 2)
    bw = max(5.0, min(22.0, 640.0 / max(1, len(methods) * len(classes))))
    group = len(methods) * bw + max(8.0, bw)
    left = max(52.0, 4.4 * len(_short(classes[0])) - group / 2 + 8) if classes else 52.0
    top, ph = 12.0, 240.0
    pw = max(600.0, group * len(classes))
    bottom = 22 + 4.6 * max((len(_short(c)) for c in classes), default=1)  # room for -45 deg labels

    def fy(v: float) -> float:
        return top + ph * (1 - v / 100)

    parts = _frame((left, top, pw, ph), [], [0, 20, 40, 60, 80, 100], None, fy, "", "accuracy (%)")
    x_start = left + (pw - group * len(classes)) / 2 + (group - len(methods) * bw) / 2
    parts += _side_bands(classes, side_of, x_start, group, top, ph)
    for j, cname in enumerate(classes):
        gx = x_start + j * group
        for i, method in enumerate(methods):
            v: Any = per_class[method].get(cname)
            x = gx + i * bw
            if finite(v):
                val = min(max(float(v), 0.0), 100.0)
                tip = esc(f"{method} / {cname}: {float(v):.2f}")
                # A zero is a 2-pixel bar in the method's colour: seen, unlike a missing value.
                height = max(fy(0) - fy(val), 2.0)
                parts.append(f'<rect x="{x:.1f}" y="{fy(0) - height:.1f}" width="{bw - 1:.1f}" '
                             f'height="{height:.1f}" fill="{colours[method]}">'
                             f"<title>{tip}</title></rect>")
            else:  # no test image of this class: a grey tick on the axis, not a zero-height bar
                parts.append(f'<rect x="{x:.1f}" y="{fy(0) - 2:.1f}" width="{bw - 1:.1f}" height="2" '
                             f'fill="#bbb"><title>{esc(f"{method} / {cname}: no data")}</title></rect>')
        lx = gx + len(methods) * bw / 2
        parts.append(f'<text transform="translate({lx:.1f},{top + ph + 12}) rotate(-45)" text-anchor="end">'
                     f"<title>{esc(cname)}</title>{esc(_short(cname))}</text>")
    svg = _svg(left + pw + 16, top + ph + bottom, parts, "per-class accuracy per method")
    return f'<div class="chart">{svg}</div>'


def _side_bands(classes: list[str], side_of: Mapping[str, str], x_start: float, group: float,
                top: float, ph: float) -> list[str]:
    """A shaded band behind the new classes and a label over each side."""
    out = []
    for side in ("base", "new"):
        idx = [j for j, c in enumerate(classes) if side_of.get(c) == side]
        if not idx:
            continue
        x0, x1 = x_start + idx[0] * group - 4, x_start + (idx[-1] + 1) * group - 4
        if side == "new":
            out.append(f'<rect x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" height="{ph}" '
                       'fill="#f2f2f7"/>')
        out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{top + 11}" text-anchor="middle" '
                   f'font-weight="600">{side} classes</text>')
    return out


def _even(idx: np.ndarray, cap: int) -> np.ndarray:
    """At most `cap` of `idx`, evenly spaced (deterministic)."""
    return idx if len(idx) <= cap else idx[np.linspace(0, len(idx) - 1, cap).round().astype(int)]


def projection(proj: Mapping[str, Any]) -> str:
    """Real (filled circles) and synthetic (crosses) features on the first two principal axes,
    fitted on both sets together; one colour per class, equal scale on both axes."""
    real, syn, names = proj["real"], proj["synthetic"], proj["classnames"]
    pts, share = pca_2d(np.concatenate([real["features"], syn["features"]]))  # (N + M, 2)
    kinds = {"real": (pts[: len(real["labels"])], real["labels"]),
             "synthetic": (pts[len(real["labels"]):], syn["labels"])}
    left, top, pw, ph = 60.0, 12.0, 580.0, 440.0
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    upp = max((hi[0] - lo[0]) / pw, (hi[1] - lo[1]) / ph, 1e-12) * 1.08  # data units per pixel
    (cx, cy), (hw, hh) = (lo + hi) / 2, (upp * pw / 2, upp * ph / 2)

    def fx(v: float) -> float:
        return left + (v - cx + hw) / upp

    def fy(v: float) -> float:
        return top + (cy + hh - v) / upp

    xt = [t for t in _ticks(cx - hw, cx + hw) if cx - hw <= t <= cx + hw]
    yt = [t for t in _ticks(cy - hh, cy + hh) if cy - hh <= t <= cy + hh]
    parts = _frame((left, top, pw, ph), xt, yt, fx, fy, f"PC1 ({100 * share[0]:.1f}% of variance)",
                   f"PC2 ({100 * share[1]:.1f}% of variance)")
    used = sorted(set(real["labels"].tolist()) | set(syn["labels"].tolist()))
    for pos, k in enumerate(used):
        colour = CLASS_PALETTE[pos % len(CLASS_PALETTE)]
        p, lab = kinds["real"]
        for x, y in p[_even(np.flatnonzero(lab == k), MAX_POINTS)]:
            parts.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3.2" fill="{colour}" '
                         'fill-opacity=".8"/>')
        p, lab = kinds["synthetic"]
        d = "".join(f"M{fx(x) - 3:.1f} {fy(y) - 3:.1f}l6 6m0 -6l-6 6"
                    for x, y in p[_even(np.flatnonzero(lab == k), MAX_POINTS)])
        if d:
            parts.append(f'<path d="{d}" stroke="{colour}" stroke-width="1.6" fill="none"/>')
    svg = _svg(left + pw + 16, top + ph + 46, parts, "PCA projection of real and synthesized features")
    key = '<span>&#9679; real</span><span>&times; synthetic</span>'
    caption = (f'<p class="caption">{len(kinds["real"][1])} real and {len(kinds["synthetic"][1])} '
               f"synthesized features; PCA fitted on both together; at most {MAX_POINTS} points drawn "
               "per class and kind; colours repeat after ten classes.</p>")
    colours = {names[k]: CLASS_PALETTE[pos % len(CLASS_PALETTE)] for pos, k in enumerate(used)}
    return legend([names[k] for k in used], key, colours) + f'<div class="chart">{svg}</div>' + caption


def curves(curves: Mapping[str, Any], colours: Mapping[str, str] | None = None,
           ylabel: str = "") -> str:
    """One SVG, one panel per curve (each its own y scale: a loss and an accuracy do not share
    one). A panel named like a method takes its colour; its series (seeds) differ by dashes."""
    names = list(curves)
    cols = min(2, len(names))
    cell_w, cell_h, gap = 500.0, 250.0, 24.0
    parts: list[str] = []
    for i, name in enumerate(names):
        ox, oy = (i % cols) * (cell_w + gap), (i // cols) * (cell_h + gap)
        box = (ox + 58.0, oy + 26.0, cell_w - 72.0, cell_h - 66.0)
        series = curves[name] if isinstance(curves[name], Mapping) else {"": curves[name]}
        keys = "   ".join(f"{DASH_GLYPHS[j % len(DASHES)]} {label}"
                           for j, label in enumerate(series) if label)
        parts.append(f'<text x="{box[0]}" y="{oy + 16}" font-weight="600">{esc(name)}'
                     f'<tspan font-weight="400" dx="10">{esc(keys)}</tspan></text>')
        colour = (colours or {}).get(name, OTHER if colours else PALETTE[i % len(PALETTE)])
        parts.extend(_panel(box, list(series.values()), colour, ylabel))
    rows = math.ceil(len(names) / cols)
    svg = _svg(cols * cell_w + (cols - 1) * gap, rows * cell_h + (rows - 1) * gap, parts, "training curves")
    return f'<div class="chart">{svg}</div>'


def _panel(box: tuple[float, float, float, float], series: list[list[Any]], colour: str,
           ylabel: str = "") -> list[str]:
    x0, y0, w, h = box
    every = [(e, float(v)) for values in series for e, v in enumerate(values, start=1) if finite(v)]
    if not every:
        return [f'<text x="{x0 + w / 2}" y="{y0 + h / 2}" text-anchor="middle">no finite values</text>']
    ys = [v for _, v in every]
    longest = max(len(values) for values in series)
    xt, yt = _ticks(1, longest, integer=True), _ticks(min(ys), max(ys))

    def fx(e: float) -> float:
        return x0 + w * (e - xt[0]) / (xt[-1] - xt[0])

    def fy(v: float) -> float:
        return y0 + h * (yt[-1] - v) / (yt[-1] - yt[0])

    out = _frame(box, xt, yt, fx, fy, "epoch", ylabel)
    for j, values in enumerate(series):
        dash = f' stroke-dasharray="{DASHES[j % len(DASHES)]}"' if DASHES[j % len(DASHES)] else ""
        segment: list[str] = []
        for e, v in enumerate(values, start=1):  # a missing value breaks the line
            if finite(v):
                segment.append(f"{fx(e):.1f},{fy(float(v)):.1f}")
            if (not finite(v) or e == len(values)) and segment:
                out.append(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{colour}" '
                           f'stroke-width="2"{dash}/>')
                segment = []
        if len(values) <= 40:
            out.extend(f'<circle cx="{fx(e):.1f}" cy="{fy(float(v)):.1f}" r="2.6" fill="{colour}">'
                       f"<title>epoch {e}: {float(v):.4g}</title></circle>"
                       for e, v in enumerate(values, start=1) if finite(v))
    return out


def legend(labels: list[str], extra: str = "", colours: Mapping[str, str] | None = None) -> str:
    colours = {**method_colours(labels), **(colours or {})}
    items = "".join(f'<span><span class="sw" style="background:{colours[name]}"></span>'
                    f"{esc(name)}</span>" for name in labels)
    return f'<div class="legend">{items}{extra}</div>'
