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
    curves (optional): {panel: [float | None per epoch] | {series: [float | None per epoch]}}
                                 a panel named like a table method takes that method's colour;
                                 its series (seeds) differ by dash pattern
    curves_y (optional): str     the curves' y-axis label (e.g. "loss")
    sides (optional): {base: [classname, ...], new: [classname, ...]}  groups the per-class bars
    key (optional): str          the report artefact's key, kept in a <meta> tag (`report_key`)
    run (optional): str          the key of the run it reports, kept in a <meta> tag too
Accuracies are percentages; NaN or None prints as a dash. Optional sections may also be None.
"""

from __future__ import annotations

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
from .report_charts import bars, curves, esc, finite, legend, method_colours, projection

COLUMNS = (("base", "Base"), ("new", "New"), ("h", "H"),
           ("gzsl_seen", "GZSL seen"), ("gzsl_unseen", "GZSL unseen"), ("gzsl_h", "GZSL H"))
REQUIRED = ("title", "notes", "protocol", "table", "per_class")
OPTIONAL = ("projection", "curves", "key", "run", "curves_y", "sides")
ROW_REQUIRED = ("method", "base", "new", "h", "gzsl_seen", "gzsl_unseen", "gzsl_h", "seeds")
ROW_OPTIONAL = ("base_std", "new_std")
RUN_META = "shipyard-run"
KEY_META = "shipyard-report-key"
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
max-width:1100px;margin:2rem auto;padding:0 1.25rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.3rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
.protocol{color:#555}.notes{background:#fff8e1;border-left:4px solid #e0a800;padding:.5rem 1rem}
.notes p{margin:.25rem 0}table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #cfd4da;padding:.35rem .75rem;text-align:right}th{background:#f3f4f6}
td.method,th.method{text-align:left;white-space:nowrap}td.best{font-weight:700;background:#dff3e4}
.std{color:#777;font-size:.8em}.chart,.table-wrap{overflow-x:auto}.chart svg{display:block}
svg text{font-size:11px;fill:#333}.legend{display:flex;flex-wrap:wrap;gap:.3rem 1.1rem;font-size:.9rem}
.sw{display:inline-block;width:.8rem;height:.8rem;margin-right:.35rem;vertical-align:-1px;border-radius:2px}
.caption{color:#555;font-size:.9rem}
"""


def render_report(data: Mapping[str, Any]) -> str:
    """The report as one HTML string; `data` follows the module docstring's schema."""
    d = validate(data)
    body = [f"<h1>{esc(d['title'])}</h1>", f'<p class="protocol">Protocol: {esc(d["protocol"])}</p>']
    if d["notes"]:
        body.append('<div class="notes">' + "".join(f"<p>{esc(n)}</p>" for n in d["notes"]) + "</div>")
    body.append(_section("results", "Results", _table(d["table"])))
    if d["per_class"]:
        colours = method_colours([r["method"] for r in d["table"]])
        body.append(_section("per-class", "Per-class accuracy (%)",
                             legend(list(d["per_class"]), colours=colours)
                             + bars(d["per_class"], colours, d.get("sides"))))
    if d.get("projection"):
        body.append(_section("projection", "Real vs synthesized features (PCA, 2-D)",
                             projection(d["projection"])))
    if d.get("curves"):
        body.append(_section("curves", "Training curves",
                             curves(d["curves"], method_colours([r["method"] for r in d["table"]]),
                                    d.get("curves_y") or "")))
    key = "".join(f'<meta name="{meta}" content="{esc(d[field])}">'
                  for meta, field in ((KEY_META, "key"), (RUN_META, "run")) if d.get(field))
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">' + key +
            f"<title>{esc(d['title'])}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def report_key(path: str | os.PathLike[str]) -> str | None:
    """The key a written report carries, or None (no file, or written without one)."""
    return report_meta(path).get("key")


def report_meta(path: str | os.PathLike[str]) -> dict[str, str]:
    """The keys a written report carries: its own (`key`) and its run's (`run`), where present."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return {}
    out = {}
    for meta, field in ((KEY_META, "key"), (RUN_META, "run")):
        found = re.search(f'<meta name="{meta}" content="([0-9a-f]+)">', head)
        if found:
            out[field] = found.group(1)
    return out


def report_folder(manifest_path: Path, report_dir: Path | None = None) -> Path:
    """Where a manifest's reports go: one folder per manifest (`reports/<manifest stem>/` beside
    it, or under `report_dir`), so two manifests beside each other never overwrite each other's."""
    return Path(report_dir or manifest_path.resolve().parent / "reports") / manifest_path.stem


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
        d["projection"] = _checkprojection(d["projection"])
    for name in ("key", "run"):
        if d.get(name) is not None:
            _str(d[name], name)
    if d.get("curves") is not None:
        for name, panel in _dict(d["curves"], "curves").items():
            _str(name, "curves key")
            series = panel if isinstance(panel, Mapping) else {"": panel}
            for label, values in series.items():
                where = f"curves[{name!r}]" + (f"[{label!r}]" if label else "")
                if label:
                    _str(label, f"{where} key")
                for i, v in enumerate(_list(values, where)):
                    _num(v, f"{where}[{i}]", none_ok=True)
    if d.get("curves_y") is not None:
        _str(d["curves_y"], "curves_y")
    if d.get("sides") is not None:
        for side in ("base", "new"):
            for i, name in enumerate(_list(_dict(d["sides"], "sides").get(side, []),
                                           f"sides.{side}")):
                _str(name, f"sides.{side}[{i}]")
    return d


def _checkprojection(proj: Any) -> dict[str, Any]:
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

def _section(anchor: str, heading: str, inner: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(heading)}</h2>\n{inner}\n</section>'


def _table(rows: list[Mapping[str, Any]]) -> str:
    best = {}
    for key, _ in COLUMNS:
        values = [float(r[key]) for r in rows if finite(r[key])]
        # A lone value, or a column where every method ties, has no best.
        best[key] = max(values) if len(set(values)) > 1 else None
    head = "".join(f"<th>{esc(label)}</th>" for _, label in COLUMNS)
    lines = ['<div class="table-wrap"><table><thead><tr><th class="method">Method</th>'
             f"{head}<th>Seeds</th></tr></thead><tbody>"]
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            v = r[key]
            text = f"{float(v):.2f}" if finite(v) else "&mdash;"
            if finite(r.get(f"{key}_std")):
                text += f' <span class="std">&plusmn;{float(r[key + "_std"]):.2f}</span>'
            cls = ' class="best"' if finite(v) and float(v) == best[key] else ""
            cells.append(f"<td{cls}>{text}</td>")
        lines.append(f'<tr><td class="method">{esc(r["method"])}</td>{"".join(cells)}'
                     f"<td>{int(r['seeds'])}</td></tr>")
    note = ('<p class="caption">Accuracy in %. Bold: best in its column, unless every method '
            "ties there. GZSL: argmax over all classes.</p>")
    return "\n".join(lines) + "</tbody></table></div>" + note


# ---- SVG charts ----------------------------------------------------------------------------------

