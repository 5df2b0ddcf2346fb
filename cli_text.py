"""How each command's summary reads for people: plain text renderings of the JSON summaries
(`--json` prints the summary itself). Pure functions; `cli.py` prints what they return."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Summary = dict[str, Any]


def extract_text(s: Summary) -> str:
    lines = [
        f"extract: {s['images']} images: {s['extracted']} extracted, {s['reused']} reused, "
        f"{s['failed']} failed ({s['seconds']:.1f} s, {s['images_per_second']:.1f} images/s)",
        f"  views: {s['views_extracted']} images augmented; text sets: {s['texts_extracted']} new",
        f"  extractor {s['extractor'][:12]} in {s['store']}",
    ]
    lines += [f"  failed: {f['path']}: {f['reason']}" for f in s["failures"][:50]]
    if len(s["failures"]) > 50:
        lines.append(f"  ... and {len(s['failures']) - 50} more (--json lists all)")
    return "\n".join(lines)


def generator_text(s: Summary) -> str:
    lines = [f"train-generator on {s['device']}:"]
    for r in s["generators"]:
        final = ", ".join(f"{k} {v:.4f}" for k, v in r["final"].items())
        lines.append(f"  {r['dataset']} seed {r['seed']}: {r['status']}, {r['epochs_run']} epochs "
                     f"in {r['seconds']:.1f} s ({final}); generator {r['generator'][:12]}")
    return "\n".join(lines)


def synthesize_text(s: Summary) -> str:
    lines = [f"synthesize: {s['per_class']} features per class"]
    for r in s["sets"]:
        lines.append(f"  {r['dataset']} seed {r['seed']}: {r['classes']} classes, "
                     f"{r['synthesized']} sampled, {r['reused']} reused; "
                     f"synthetic {r['synthetic'][:12]}")
    return "\n".join(lines)


def adapter_text(s: Summary) -> str:
    lines = [f"train-adapter {', '.join(s['methods'])}:"]
    for r in s["adapters"]:
        syn = f", synthetic {r['synthetic'][:12]}" if r["synthetic"] else ""
        syn += f", synthetic domain {r['domain']}" if r.get("domain") else ""
        syn += f" from epoch {r['resumed_from_epoch']}" if r.get("resumed_from_epoch") else ""
        lines.append(f"  {r['dataset']} seed {r['seed']} {r['method']}: {r['status']}{syn} "
                     f"({r['seconds']:.1f} s); adapter {r['adapter'][:12]}")
    return "\n".join(lines)


def cache_text(s: Summary) -> str:
    lines = [f"build-cache ({s['index']}):"]
    for r in s["caches"]:
        agree = r.get("agreement")
        extra = f", top-1 agreement with exact {agree['top1_agreement']:.3f}" if agree else ""
        if agree and "candidates" in agree:
            extra = (f", T = {agree['candidates']} candidate classes{extra} on {agree['sample']} "
                     f"queries ({agree['val']} val)")
        lines.append(f"  {r['dataset']} seed {r['seed']} {r['method']}: {r['status']}, "
                     f"{r['keys']} keys, alpha {r['alpha']:.2f}, beta {r['beta']:.2f}{extra}; "
                     f"cache {r['cache'][:12]}")
    return "\n".join(lines)


def evaluate_text(s: Summary) -> str:
    lines = [f"evaluate (protocol {s['protocol']}):", *(f"  note: {n}" for n in s["notes"])]
    for d in s["datasets"]:
        lines.append(f"  {d['name']}: report {d['report']}" if d["report"] else
                     f"  {d['name']}: the report could not be written: {d.get('report_error')} "
                     "(the results below are stored)")
        lines += [f"  warning: {d['name']}: {w}" for w in d.get("warnings", [])]
        lines += [f"  cache: {n}" for n in d.get("cache_notes", [])]
        if d.get("selection"):
            lines.append(f"  selected: {d['selection']}")
        if d.get("transfer_from"):  # cross-dataset: heads trained on another dataset
            lines.append(f"  heads trained on {d['transfer_from']}, evaluated on {d['name']}'s "
                         "classes (accuracy over every class; base/new: its halves)")
            lines.append(f"    {'method':22}{'accuracy':>10}{'base':>8}{'new':>8}{'H':>8}")
            lines += [f"    {r['method']:22}{r['accuracy']:10.2f}{r['base']:8.2f}{r['new']:8.2f}"
                      f"{r['h']:8.2f}" for r in d["table"]]
            continue
        lines.append(f"    {'method':22}{'base':>8}{'new':>8}{'H':>8}   "
                     f"{'seen':>8}{'unseen':>8}{'H':>8}")
        for r in d["table"]:
            lines.append(f"    {r['method']:22}{r['base']:8.2f}{r['new']:8.2f}{r['h']:8.2f}   "
                         f"{r['gzsl_seen']:8.2f}{r['gzsl_unseen']:8.2f}{r['gzsl_h']:8.2f}")
    return "\n".join(lines)


def status_text(s: Summary) -> str:
    head = f"store {s['store']}, extractor {(s['extractor'] or '?')[:12]}: "
    lines = [head + ("up to date" if s["up_to_date"] else "stale")]
    lines += [f"  reads upstream {u} (read-only)" for u in s.get("upstream", [])]
    if "reason" in s:
        lines.append("  " + s["reason"])
    for d in s["datasets"]:
        state = "up to date" if not d["stale"] else f"{len(d['stale'])} jobs stale"
        lines.append(f"  {d['name']}: {d['records']} records, {d['unusable']} unusable: {state}")
        lines += [f"    {line}" for line in d["stale"]]
        lines += [f"    {c['id']}: {c['index']} index, top-1 agreement with dense "
                  f"{c['agreement']['top1_agreement']:.3f} on {c['agreement']['sample']} queries"
                  + (f", T = {c['agreement']['candidates']}" if "candidates" in c["agreement"] else "")
                  for c in d.get("caches", [])]
    lines += [f"  {b['name']}: cannot be planned: {b['error']}" for b in s["broken"]]
    return "\n".join(lines)


def plan_text(s: Summary) -> str:
    stale = [j for j in s["jobs"] if j["state"] == "stale"]
    lines = [f"run --dry-run: {len(s['jobs'])} jobs, {len(stale)} would run"]
    for j in s["jobs"]:
        why = f" ({'; '.join(j['reasons'])})" if j["reasons"] else ""
        lines.append(f"  {'run ' if j['reasons'] else 'keep'} {j['id']:40} {j['key'][:12]}{why}")
    lines += [f"  {b['name']}: cannot be planned: {b['error']}" for b in s["broken"]]
    return "\n".join(lines)


def info_text(s: Summary) -> str:
    """The working store, then each upstream store it reads below it."""
    parts = [_layer_text(s)]
    for i, up in enumerate(s.get("upstream", [])):
        parts.append(f"upstream {i + 1} (read-only): " + _layer_text(up))
    if s.get("reports"):
        parts.append(f"reports: {len(s['reports'])}")
        parts += [f"  {r['path']}  {(r['key'] or '?')[:12]}  {r['written']}  <- run "
                  f"{(r['run'] or '?')[:12]}"
                  + ("" if r["run_in_store"] else " (not in the store: the report outlived it)")
                  for r in s["reports"]]
    return "\n".join(parts)


def _layer_text(s: Summary) -> str:
    made = f"created {s['created']}" if s["created"] else "not created yet"
    lines = [f"store {s['store']} (format {s['format']}, {made})"]
    if s.get("published"):
        p = s["published"]
        lines.append(f"  published {p['time']} from {p['source']} by shipyard {p['shipyard']} "
                     "(read-only: it never changes)")
    for e in s["extractors"]:
        lines.append(f"  extractor {e['fp'][:12]}: {e['model']} (weights {e['weights_sha256'][:12]}), "
                     f"D={e['dim']}, {e['images']} images, {e['view_rows']} x {e['views']} views, "
                     f"{e['text_sets']} text sets")
    for d in s["datasets"]:
        splits = ", ".join(f"{k} {v}" for k, v in d["splits"].items())
        lines.append(f"  dataset {d['name']}: {d['records']} records ({splits}), {d['classes']} "
                     f"classes, {d['failures']} failures")
    listing = s.get("listing", {})
    for kind, count in s.get("artifacts", {}).items():
        lines.append(f"  {kind}: {count}")
        entries = sorted(listing.get(kind, []), key=lambda e: (e["job"] or "", e["created"] or ""))
        lines.extend(_artifact_line(e) for e in entries[:INFO_PER_KIND])
        if len(entries) > INFO_PER_KIND:
            lines.append(f"    ... and {len(entries) - INFO_PER_KIND} more (--json lists all)")
    return "\n".join(lines)


INFO_PER_KIND = 12  # artefacts listed per kind in text; --json lists every one


def _artifact_line(e: dict[str, Any]) -> str:
    """`key  job  created, device, seconds  <- input keys` (an incomplete one says so)."""
    inputs = ", ".join(f"{name} {_short(value)}" for name, value in sorted(e["inputs"].items()))
    when = ", ".join(str(x) for x in (e["created"], e["device"],
                                      None if e["seconds"] is None else f"{e['seconds']} s") if x)
    state = "" if e["complete"] else " (incomplete)"
    return f"    {e['key'][:12]}  {e['job'] or '?'}{state}  {when}  <- {inputs or 'nothing'}"


def _short(value: Any) -> str:
    """An input key (or list of keys, or a mapping of them) shortened to 12 characters each."""
    if isinstance(value, str):
        return value[:12]
    if isinstance(value, list):
        return "[" + " ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):  # a run's heads: one entry per method
        return f"({len(value)} entries)"
    return str(value)


def publish_text(s: Summary) -> str:
    lines = [f"published {s['source']} to {s['store']}: {s['arrays']} arrays, "
             f"{s['bytes'] / 2**20:.1f} MiB, verified"]
    lines += [f"  left out (incomplete): {p}" for p in s["left_out"][:20]]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


GC_LISTED = 40  # removals listed in text; --json lists every one


def gc_text(s: Summary) -> str:
    """One line per removal (reason, path, job, why, size), then the totals."""
    verb = "would remove" if s["dry_run"] else "removed"
    lines = [f"store gc {s['store']}{' (dry run)' if s['dry_run'] else ''}: {verb} "
             f"{len(s['removed'])} items, {'would free' if s['dry_run'] else 'freed'} "
             f"{_size(s['bytes_freed'])}; kept {s['kept']} artefacts"]
    for r in s["removed"][:GC_LISTED]:
        job = f"  {r['job']}" if r["job"] else ""
        path = re.sub(r"[0-9a-f]{64}", lambda m: m.group(0)[:12], r["path"])
        lines.append(f"  {r['reason']:11} {path}{job}  ({r['detail']})  {_size(r['bytes'])}")
    if len(s["removed"]) > GC_LISTED:
        lines.append(f"  ... and {len(s['removed']) - GC_LISTED} more (--json lists all)")
    if s["by_reason"]:
        lines.append("  by reason: " + ", ".join(f"{k} {v['items']} ({_size(v['bytes'])})"
                                                 for k, v in s["by_reason"].items()))
    grace = s["grace_seconds"]
    lines += [f"  kept (incomplete, touched within the grace period of {grace:g} s): {p}"
              for p in s["within_grace"]]
    lines += [f"  left alone: {p}" for p in s["skipped"]]
    return "\n".join(lines)


def unlock_text(s: Summary) -> str:
    if not s["removed"]:
        return f"{s['store']}: no writer lock"
    h = s["holder"] or {}
    return (f"removed the writer lock {s['lock']} (held by {h.get('host', '?')} pid "
            f"{h.get('pid', '?')} since {h.get('since', '?')})")


def verify_text(s: Summary) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in s["checked"].items()) or "nothing"
    more = len(s.get("layers", [])) - 1
    also = f" and its {more} upstream store{'s' if more > 1 else ''}" if more > 0 else ""
    head = f"verify {s['store']}{also}: {'ok' if s['ok'] else 'FAILED'} (checked {counts})"
    return "\n".join([head, *(f"  problem: {p}" for p in s["problems"])])


STAGE_TEXT: dict[str, Callable[[Any], str]] = {
    "extract": extract_text, "train-generator": generator_text, "synthesize": synthesize_text,
    "train-adapter": adapter_text, "build-cache": cache_text, "evaluate": evaluate_text}


def run_text(s: Summary) -> str:
    return "\n".join(f"[{name}]\n" + STAGE_TEXT[name](out) for name, out in s["stages"].items())
