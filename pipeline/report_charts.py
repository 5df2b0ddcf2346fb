"""SVG charts of the report, drawn as strings: per-class accuracy bars, the 2-D projection of real
vs synthesized features (PCA) and training curves. Inline SVG, nothing fetched."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")  # Tableau 10; repeats past 10
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


def bars(per_class: Mapping[str, Mapping[str, Any]]) -> str:
    """Grouped bars: one group per class name, one bar per method; scrolls sideways when long."""
    methods = list(per_class)
    classes = list(dict.fromkeys(c for m in methods for c in per_class[m]))
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
    for j, cname in enumerate(classes):
        gx = x_start + j * group
        for i, method in enumerate(methods):
            v: Any = per_class[method].get(cname)
            x = gx + i * bw
            if finite(v):
                val = min(max(float(v), 0.0), 100.0)
                tip = esc(f"{method} / {cname}: {float(v):.2f}")
                parts.append(f'<rect x="{x:.1f}" y="{fy(val):.1f}" width="{bw - 1:.1f}" '
                             f'height="{fy(0) - fy(val):.1f}" fill="{PALETTE[i % len(PALETTE)]}">'
                             f"<title>{tip}</title></rect>")
            else:  # no test image of this class: a grey tick on the axis, not a zero-height bar
                parts.append(f'<rect x="{x:.1f}" y="{fy(0) - 2:.1f}" width="{bw - 1:.1f}" height="2" '
                             f'fill="#bbb"><title>{esc(f"{method} / {cname}: no data")}</title></rect>')
        lx = gx + len(methods) * bw / 2
        parts.append(f'<text transform="translate({lx:.1f},{top + ph + 12}) rotate(-45)" text-anchor="end">'
                     f"<title>{esc(cname)}</title>{esc(_short(cname))}</text>")
    svg = _svg(left + pw + 16, top + ph + bottom, parts, "per-class accuracy per method")
    return f'<div class="chart">{svg}</div>'


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
        colour = PALETTE[pos % len(PALETTE)]
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
    return legend([names[k] for k in used], key) + f'<div class="chart">{svg}</div>' + caption


def curves(curves: Mapping[str, list[Any]]) -> str:
    """One SVG, one panel per curve (each its own y scale: a loss and an accuracy do not share one)."""
    names = list(curves)
    cols = min(2, len(names))
    cell_w, cell_h, gap = 500.0, 250.0, 24.0
    parts: list[str] = []
    for i, name in enumerate(names):
        ox, oy = (i % cols) * (cell_w + gap), (i // cols) * (cell_h + gap)
        box = (ox + 58.0, oy + 26.0, cell_w - 72.0, cell_h - 66.0)
        parts.append(f'<text x="{box[0]}" y="{oy + 16}" font-weight="600">{esc(name)}</text>')
        parts.extend(_panel(box, curves[name], PALETTE[i % len(PALETTE)]))
    rows = math.ceil(len(names) / cols)
    svg = _svg(cols * cell_w + (cols - 1) * gap, rows * cell_h + (rows - 1) * gap, parts, "training curves")
    return f'<div class="chart">{svg}</div>'


def _panel(box: tuple[float, float, float, float], values: list[Any], colour: str) -> list[str]:
    x0, y0, w, h = box
    pts = [(e, float(v)) for e, v in enumerate(values, start=1) if finite(v)]
    if not pts:
        return [f'<text x="{x0 + w / 2}" y="{y0 + h / 2}" text-anchor="middle">no finite values</text>']
    ys = [v for _, v in pts]
    xt, yt = _ticks(1, len(values), integer=True), _ticks(min(ys), max(ys))

    def fx(e: float) -> float:
        return x0 + w * (e - xt[0]) / (xt[-1] - xt[0])

    def fy(v: float) -> float:
        return y0 + h * (yt[-1] - v) / (yt[-1] - yt[0])

    out = _frame(box, xt, yt, fx, fy, "epoch", "")
    segment: list[str] = []
    for e, v in enumerate(values, start=1):  # a missing value breaks the line
        if finite(v):
            segment.append(f"{fx(e):.1f},{fy(float(v)):.1f}")
        if (not finite(v) or e == len(values)) and segment:
            out.append(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{colour}" '
                       'stroke-width="2"/>')
            segment = []
    if len(values) <= 40:
        out.extend(f'<circle cx="{fx(e):.1f}" cy="{fy(v):.1f}" r="2.6" fill="{colour}">'
                   f"<title>epoch {e}: {v:.4g}</title></circle>" for e, v in pts)
    return out


def legend(labels: list[str], extra: str = "") -> str:
    items = "".join(f'<span><span class="sw" style="background:{PALETTE[i % len(PALETTE)]}"></span>'
                    f"{esc(name)}</span>" for i, name in enumerate(labels))
    return f'<div class="legend">{items}{extra}</div>'
