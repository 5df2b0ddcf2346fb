"""One self-contained HTML report (inline CSS and SVG; nothing is fetched) rendered from a plain
dict, so it can be rebuilt from stored JSON results.

Input schema, checked by `validate` (a violation raises UsageError naming the field):
    title: str
    notes: [str, ...]            caveats shown first, e.g. "random weights: numbers say nothing"
    protocol: str                how numbers were selected and averaged ("clean: last epoch, ...")
    table: [{method: str, base: float, new: float, h: float, gzsl_seen: float | None,
             gzsl_unseen: float | None, gzsl_h: float | None, seeds: int,
             base_std: float, new_std: float (both optional, shown as "± s")}, ...]
    per_class: {method: {classname: float | None}}
    projection (optional): {classnames: [str, ...],
                            real: {features: (N, D) nested list or array, labels: N ints},
                            synthetic: {features: (M, D), labels: M ints}}  labels index classnames
    curves (optional): {name: [float | None per epoch]}
    key (optional): str          the report artefact's key, kept in a <meta> tag (`report_key`)
Accuracies are percentages; NaN or None prints as a dash. Optional sections may also be None.
"""

from __future__ import annotations

import html
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import suppress
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")  # Tableau 10; repeats past 10
COLUMNS = (("base", "Base"), ("new", "New"), ("h", "H"),
           ("gzsl_seen", "GZSL seen"), ("gzsl_unseen", "GZSL unseen"), ("gzsl_h", "GZSL H"))
REQUIRED = ("title", "notes", "protocol", "table", "per_class")
OPTIONAL = ("projection", "curves", "key")
ROW_REQUIRED = ("method", "base", "new", "h", "gzsl_seen", "gzsl_unseen", "gzsl_h", "seeds")
ROW_OPTIONAL = ("base_std", "new_std")
KEY_META = "shipyard-report-key"
MAX_POINTS = 200  # drawn per class and kind in the projection; the PCA itself uses every point
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
max-width:1100px;margin:2rem auto;padding:0 1.25rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.3rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
.protocol{color:#555}.notes{background:#fff8e1;border-left:4px solid #e0a800;padding:.5rem 1rem}
.notes p{margin:.25rem 0}table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #cfd4da;padding:.35rem .75rem;text-align:right}th{background:#f3f4f6}
td.method,th.method{text-align:left}td.best{font-weight:700;background:#dff3e4}
.std{color:#777;font-size:.8em}.chart{overflow-x:auto}.chart svg{display:block}
svg text{font-size:11px;fill:#333}.legend{display:flex;flex-wrap:wrap;gap:.3rem 1.1rem;font-size:.9rem}
.sw{display:inline-block;width:.8rem;height:.8rem;margin-right:.35rem;vertical-align:-1px;border-radius:2px}
.caption{color:#555;font-size:.9rem}
"""


def render_report(data: Mapping[str, Any]) -> str:
    """The report as one HTML string; `data` follows the module docstring's schema."""
    d = validate(data)
    body = [f"<h1>{_esc(d['title'])}</h1>", f'<p class="protocol">Protocol: {_esc(d["protocol"])}</p>']
    if d["notes"]:
        body.append('<div class="notes">' + "".join(f"<p>{_esc(n)}</p>" for n in d["notes"]) + "</div>")
    body.append(_section("results", "Results", _table(d["table"])))
    if d["per_class"]:
        methods = list(d["per_class"])
        body.append(_section("per-class", "Per-class accuracy (%)", _legend(methods) + _bars(d["per_class"])))
    if d.get("projection"):
        body.append(_section("projection", "Real vs synthesized features (PCA, 2-D)",
                             _projection(d["projection"])))
    if d.get("curves"):
        body.append(_section("curves", "Training curves", _curves(d["curves"])))
    key = f'<meta name="{KEY_META}" content="{_esc(d["key"])}">' if d.get("key") else ""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">' + key +
            f"<title>{_esc(d['title'])}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def report_key(path: str | os.PathLike[str]) -> str | None:
    """The key a written report carries, or None (no file, or written without one)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return None
    found = re.search(f'<meta name="{KEY_META}" content="([0-9a-f]+)">', head)
    return found.group(1) if found else None


def write_report(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Render and publish atomically: a temporary file beside `path`, then a rename."""
    text = render_report(data)  # a bad input raises here, before anything is written
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


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

def validate(data: Any) -> dict[str, Any]:
    """A checked copy of `data`, projection features as float arrays; UsageError on any violation."""
    if not isinstance(data, Mapping):
        _fail("", f"must be a dict, got {type(data).__name__}")
    _keys(data, REQUIRED, OPTIONAL, "")
    d = dict(data)
    _str(d["title"], "title")
    _str(d["protocol"], "protocol")
    for i, note in enumerate(_list(d["notes"], "notes")):
        _str(note, f"notes[{i}]")
    for i, row in enumerate(_list(d["table"], "table")):
        where = f"table[{i}]"
        if not isinstance(row, Mapping):
            _fail(where, f"must be a dict, got {type(row).__name__}")
        _keys(row, ROW_REQUIRED, ROW_OPTIONAL, where + ".")
        _str(row["method"], f"{where}.method")
        for key in ("base", "new", "h", *[k for k in ROW_OPTIONAL if k in row]):
            _num(row[key], f"{where}.{key}", none_ok=False)
        for key in ("gzsl_seen", "gzsl_unseen", "gzsl_h"):
            _num(row[key], f"{where}.{key}", none_ok=True)
        if not isinstance(row["seeds"], Integral) or isinstance(row["seeds"], bool) or row["seeds"] < 0:
            _fail(f"{where}.seeds", f"must be a count (int >= 0), got {row['seeds']!r}")
    for method, accs in _dict(d["per_class"], "per_class").items():
        _str(method, "per_class key")
        for name, acc in _dict(accs, f"per_class[{method!r}]").items():
            _str(name, f"per_class[{method!r}] key")
            _num(acc, f"per_class[{method!r}][{name!r}]", none_ok=True)
    if d.get("projection") is not None:
        d["projection"] = _check_projection(d["projection"])
    if d.get("key") is not None:
        _str(d["key"], "key")
    if d.get("curves") is not None:
        for name, values in _dict(d["curves"], "curves").items():
            _str(name, "curves key")
            if not _list(values, f"curves[{name!r}]"):
                _fail(f"curves[{name!r}]", "is empty")
            for i, v in enumerate(values):
                _num(v, f"curves[{name!r}][{i}]", none_ok=True)
    return d


def _check_projection(proj: Any) -> dict[str, Any]:
    _keys(_dict(proj, "projection"), ("classnames", "real", "synthetic"), (), "projection.")
    names = _list(proj["classnames"], "projection.classnames")
    for i, n in enumerate(names):
        _str(n, f"projection.classnames[{i}]")
    out: dict[str, Any] = {"classnames": list(names)}
    for kind in ("real", "synthetic"):
        where = f"projection.{kind}"
        _keys(_dict(proj[kind], where), ("features", "labels"), (), where + ".")
        try:
            x = np.asarray(proj[kind]["features"], dtype=np.float64)
            y = np.asarray(proj[kind]["labels"])
        except (TypeError, ValueError) as exc:
            raise UsageError(f"report data: {where} is not numeric and rectangular ({exc})") from exc
        if x.size == 0 and y.size == 0:
            x, y = x.reshape(0, x.shape[-1] if x.ndim == 2 else 0), y.astype(np.int64)
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            _fail(where, f"needs features (N, D) and labels (N,), got {x.shape} and {y.shape}")
        if not np.isfinite(x).all():
            _fail(f"{where}.features", "holds NaN or infinite values")
        if y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() >= len(names))):
            _fail(f"{where}.labels", f"must be ints indexing classnames (0..{len(names) - 1})")
        out[kind] = {"features": x, "labels": y.astype(np.int64)}
    dims = {out[k]["features"].shape[1] for k in ("real", "synthetic") if len(out[k]["features"])}
    if len(dims) > 1:
        _fail("projection", f"real and synthetic features differ in dimension: {sorted(dims)}")
    if not dims:
        _fail("projection", "has no points")
    return out


def _fail(where: str, msg: str) -> None:
    raise UsageError(f"report data: {where} {msg}".replace(":  ", ": "))


def _keys(obj: Mapping[str, Any], required: Iterable[str], optional: Iterable[str], where: str) -> None:
    required, allowed = list(required), {*required, *optional}
    missing = [k for k in required if k not in obj]
    if missing:
        _fail(where.rstrip(".") or "top level", f"lacks {', '.join(map(repr, missing))}")
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        _fail(where.rstrip(".") or "top level",
              f"has unknown {', '.join(map(repr, unknown))} (expected {', '.join(sorted(allowed))})")


def _str(v: Any, where: str) -> None:
    if not isinstance(v, str):
        _fail(where, f"must be a string, got {type(v).__name__}")


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list | tuple):
        _fail(where, f"must be a list, got {type(v).__name__}")
    return list(v)


def _dict(v: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        _fail(where, f"must be a dict, got {type(v).__name__}")
    return v


def _num(v: Any, where: str, none_ok: bool) -> None:
    if (v is None and none_ok) or (isinstance(v, Real) and not isinstance(v, bool)):
        return
    _fail(where, f"must be a number{' or None' if none_ok else ''}, got {v!r}")


# ---- HTML pieces ---------------------------------------------------------------------------------

def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(float(v))


def _section(anchor: str, heading: str, inner: str) -> str:
    return f'<section id="{anchor}"><h2>{_esc(heading)}</h2>\n{inner}\n</section>'


def _legend(labels: list[str], extra: str = "") -> str:
    items = "".join(f'<span><span class="sw" style="background:{PALETTE[i % len(PALETTE)]}"></span>'
                    f"{_esc(name)}</span>" for i, name in enumerate(labels))
    return f'<div class="legend">{items}{extra}</div>'


def _table(rows: list[Mapping[str, Any]]) -> str:
    best = {}
    for key, _ in COLUMNS:
        values = [float(r[key]) for r in rows if _finite(r[key])]
        best[key] = max(values) if len(values) > 1 else None  # a lone value is best of nothing
    head = "".join(f"<th>{_esc(label)}</th>" for _, label in COLUMNS)
    lines = [f'<table><thead><tr><th class="method">Method</th>{head}<th>Seeds</th></tr></thead><tbody>']
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            v = r[key]
            text = f"{float(v):.2f}" if _finite(v) else "&mdash;"
            if _finite(r.get(f"{key}_std")):
                text += f' <span class="std">&plusmn;{float(r[key + "_std"]):.2f}</span>'
            cls = ' class="best"' if _finite(v) and float(v) == best[key] else ""
            cells.append(f"<td{cls}>{text}</td>")
        lines.append(f'<tr><td class="method">{_esc(r["method"])}</td>{"".join(cells)}'
                     f"<td>{int(r['seeds'])}</td></tr>")
    note = '<p class="caption">Accuracy in %. Bold: best in its column. GZSL: argmax over all classes.</p>'
    return "\n".join(lines) + "</tbody></table>" + note


# ---- SVG charts ----------------------------------------------------------------------------------

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
    digits = next(d for d in range(8) if abs(round(step, d) - step) <= 1e-9 * max(1.0, abs(step)))
    text = f"{v:.{digits}f}"
    return text[1:] if float(text) == 0 and text.startswith("-") else text


def _svg(width: float, height: float, inner: list[str], label: str) -> str:
    return (f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'role="img" aria-label="{_esc(label)}">' + "".join(inner) + "</svg>")


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
        out.append(f'<text x="{x0 + w / 2:.1f}" y="{y0 + h + 32}" text-anchor="middle">{_esc(xlabel)}</text>')
    if ylabel:
        out.append(f'<text transform="translate({x0 - 40},{y0 + h / 2:.1f}) rotate(-90)" '
                   f'text-anchor="middle">{_esc(ylabel)}</text>')
    return out


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _bars(per_class: Mapping[str, Mapping[str, Any]]) -> str:
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
            if _finite(v):
                val = min(max(float(v), 0.0), 100.0)
                tip = _esc(f"{method} / {cname}: {float(v):.2f}")
                parts.append(f'<rect x="{x:.1f}" y="{fy(val):.1f}" width="{bw - 1:.1f}" '
                             f'height="{fy(0) - fy(val):.1f}" fill="{PALETTE[i % len(PALETTE)]}">'
                             f"<title>{tip}</title></rect>")
            else:  # no test image of this class: a grey tick on the axis, not a zero-height bar
                parts.append(f'<rect x="{x:.1f}" y="{fy(0) - 2:.1f}" width="{bw - 1:.1f}" height="2" '
                             f'fill="#bbb"><title>{_esc(f"{method} / {cname}: no data")}</title></rect>')
        lx = gx + len(methods) * bw / 2
        parts.append(f'<text transform="translate({lx:.1f},{top + ph + 12}) rotate(-45)" text-anchor="end">'
                     f"<title>{_esc(cname)}</title>{_esc(_short(cname))}</text>")
    svg = _svg(left + pw + 16, top + ph + bottom, parts, "per-class accuracy per method")
    return f'<div class="chart">{svg}</div>'


def _even(idx: np.ndarray, cap: int) -> np.ndarray:
    """At most `cap` of `idx`, evenly spaced (deterministic)."""
    return idx if len(idx) <= cap else idx[np.linspace(0, len(idx) - 1, cap).round().astype(int)]


def _projection(proj: Mapping[str, Any]) -> str:
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
    return _legend([names[k] for k in used], key) + f'<div class="chart">{svg}</div>' + caption


def _curves(curves: Mapping[str, list[Any]]) -> str:
    """One SVG, one panel per curve (each its own y scale: a loss and an accuracy do not share one)."""
    names = list(curves)
    cols = min(2, len(names))
    cell_w, cell_h, gap = 500.0, 250.0, 24.0
    parts: list[str] = []
    for i, name in enumerate(names):
        ox, oy = (i % cols) * (cell_w + gap), (i // cols) * (cell_h + gap)
        box = (ox + 58.0, oy + 26.0, cell_w - 72.0, cell_h - 66.0)
        parts.append(f'<text x="{box[0]}" y="{oy + 16}" font-weight="600">{_esc(name)}</text>')
        parts.extend(_panel(box, curves[name], PALETTE[i % len(PALETTE)]))
    rows = math.ceil(len(names) / cols)
    svg = _svg(cols * cell_w + (cols - 1) * gap, rows * cell_h + (rows - 1) * gap, parts, "training curves")
    return f'<div class="chart">{svg}</div>'


def _panel(box: tuple[float, float, float, float], values: list[Any], colour: str) -> list[str]:
    x0, y0, w, h = box
    pts = [(e, float(v)) for e, v in enumerate(values, start=1) if _finite(v)]
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
        if _finite(v):
            segment.append(f"{fx(e):.1f},{fy(float(v)):.1f}")
        if (not _finite(v) or e == len(values)) and segment:
            out.append(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{colour}" '
                       'stroke-width="2"/>')
            segment = []
    if len(values) <= 40:
        out.extend(f'<circle cx="{fx(e):.1f}" cy="{fy(v):.1f}" r="2.6" fill="{colour}">'
                   f"<title>epoch {e}: {v:.4g}</title></circle>" for e, v in pts)
    return out
