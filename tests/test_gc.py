"""`store gc`: what it removes and why, what it keeps, that a dry run lists exactly what a gc then
removes, that the bytes it reports are the bytes the store loses, and that the next run
recomputes nothing."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from shipyard.cli import app
from shipyard.pipeline.artifacts import (
    ADAPTER,
    CACHE,
    CONTENT_INPUTS,
    GENERATOR,
    INPUT_KINDS,
    REPORT,
    RUN,
    SYNTHETIC,
    Ref,
    input_refs,
    keys_of,
)
from shipyard.pipeline.collect import parse_duration
from shipyard.pipeline.manifest_files import load_manifest
from shipyard.pipeline.store import FeatureStore
from typer.testing import CliRunner

from tests.conftest import copy_run, manifest_dict, run_once

TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "a close-up photo of a {}.",
             "a blurry photo of a {}."]


def _data(small_demo: Path, store: Path) -> dict[str, Any]:
    data = manifest_dict(small_demo, store)
    data["ship"] = {"epochs": 3, "synthesize": {"per_class": 4}}
    data["heads"] = {"methods": ["zero-shot", "tip-adapter", "tip-adapter-f+ship", "coop"],
                     "overrides": {"coop": {"epochs": 2}, "tip-adapter-f": {"epochs": 2}}}
    data["datasets"][0]["seeds"] = [1]
    return data


def invoke(path: Path, *args: str) -> Any:
    result = CliRunner().invoke(app, ["--manifest", str(path), "--device", "cpu", *args])
    return result


def _json(path: Path, *args: str) -> dict[str, Any]:
    result = invoke(path, *args, "--json")
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def _template(path: Path, template: str) -> None:
    data = yaml.safe_load(path.read_text())
    data["datasets"][0]["templates"] = [template]
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _files(store: Path) -> dict[str, int]:
    return {p.relative_to(store).as_posix(): p.stat().st_size for p in store.rglob("*")
            if p.is_file()}


def _recomputed(out: dict[str, Any]) -> list[str]:
    return [j["id"] for j in out["jobs"] if j["status"] != "up to date"]


@pytest.fixture(scope="module")
def ran_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("gc")
    return root, run_once(root, _data)


@pytest.fixture
def ran(ran_once: tuple[Path, str], tmp_path: Path, small_demo: Path) -> Path:
    path, _ = copy_run(*ran_once, tmp_path, _data)
    return path


def _store(path: Path) -> Path:
    return path.parent / "s.zarr"


def test_template_changes_then_gc_frees_what_they_superseded_and_nothing_is_recomputed(
        ran: Path) -> None:
    store = _store(ran)
    before = _files(store)
    for template in TEMPLATES[1:]:
        _template(ran, template)
        assert _recomputed(_json(ran, "run"))  # each change rebuilds the template's readers
    grown = _files(store)
    superseded = sum(grown.values()) - sum(before.values())
    dry = _json(ran, "store", "gc", "--dry-run")
    assert _files(store) == grown  # a dry run changes nothing
    real = _json(ran, "store", "gc")
    assert real["removed"] == dry["removed"]  # the dry run listed exactly what gc removed
    after = _files(store)
    assert sum(grown.values()) - sum(after.values()) == real["bytes_freed"]  # bytes it reports
    assert real["bytes_freed"] >= 0.9 * superseded
    # Three changes superseded, per change: the text set, the cache, the adapter, the run.
    counts = Counter((r["reason"], r["kind"]) for r in real["removed"])
    assert counts == {("superseded", "text-set"): 3, ("superseded", "cache"): 3,
                      ("superseded", "adapter"): 3, ("superseded", "run"): 3}
    assert _recomputed(_json(ran, "run")) == []
    assert _json(ran, "store", "gc")["removed"] == []  # nothing more to collect
    assert set(after) <= set(grown)


def test_the_manifests_artefact_is_kept_even_when_a_newer_one_of_its_job_exists(
        ran: Path) -> None:
    """A → B → A: the second A finds its artefacts again (nothing is rebuilt), so B's are the
    newest; gc keeps the manifest's (A's) and removes B's."""
    store = _store(ran)
    with FeatureStore.open(str(store)) as s:
        first_runs = set(keys_of(s.root, RUN))
    _template(ran, TEMPLATES[1])
    _json(ran, "run")
    _template(ran, TEMPLATES[0])
    assert _recomputed(_json(ran, "run")) == ["report:demo"]  # only the file beside the manifest
    real = _json(ran, "store", "gc")
    removed_runs = [r for r in real["removed"] if r["kind"] == "run"]
    assert len(removed_runs) == 1 and "the manifest's" in removed_runs[0]["detail"]
    with FeatureStore.open(str(store)) as s:
        assert set(keys_of(s.root, RUN)) == first_runs
    assert _recomputed(_json(ran, "run")) == []


def _commit_fake(s: FeatureStore, kind: Any, key: str, job: str, inputs: dict[str, Any],
                 created: str) -> None:
    record = {"job": job, "kind": kind.name, "key": key, "params": {}, "inputs": inputs}
    draft = s.begin(Ref.of(kind, key), record)
    s.commit(draft, {})
    draft.group.attrs["provenance"] = {**draft.group.attrs["provenance"], "created": created}


def test_a_job_the_manifest_does_not_plan_keeps_its_newest_and_what_that_reads(ran: Path) -> None:
    """Hand-run heads (not in the manifest) keep their newest artefact; an older one goes,
    unless a kept artefact reads it."""
    store = _store(ran)
    with FeatureStore.open(str(store), read_only=False) as s:
        adapter = next(k for k in keys_of(s.root, ADAPTER))
        ex = record_inputs(s, ADAPTER, adapter)["extractor"]
        _commit_fake(s, ADAPTER, "a" * 64, "adapter:demo:seed1:lp", {"extractor": ex},
                     "2026-01-01T00:00:00+00:00")
        _commit_fake(s, ADAPTER, "b" * 64, "adapter:demo:seed1:lp", {"extractor": ex},
                     "2026-01-02T00:00:00+00:00")
        _commit_fake(s, ADAPTER, "c" * 64, "adapter:demo:seed1:lp2", {"extractor": ex},
                     "2026-01-01T00:00:00+00:00")
        _commit_fake(s, ADAPTER, "d" * 64, "adapter:demo:seed1:lp2", {"extractor": ex},
                     "2026-01-02T00:00:00+00:00")
        # The newest run of another job reads lp2's older adapter: that one stays.
        _commit_fake(s, RUN, "e" * 64, "run:hand", {"heads": {"lp2": {
            "kind": "adapter", "keys": ["c" * 64]}}}, "2026-01-03T00:00:00+00:00")
    real = _json(ran, "store", "gc")
    gone = {r["path"]: r for r in real["removed"]}
    assert set(gone) == {f"adapters/{'a' * 64}"}
    assert gone[f"adapters/{'a' * 64}"]["detail"] == f"by {'b' * 12} (the newest)"


def record_inputs(s: FeatureStore, kind: Any, key: str) -> dict[str, Any]:
    group = s.lookup(Ref.of(kind, key))
    assert group is not None
    return dict(group.attrs["record"]["inputs"])


def test_orphans_go_to_a_fixpoint_and_their_readers_with_them(ran: Path) -> None:
    """The generator removed by hand: the synthetic set from it is an orphan, and so is every
    head reading that set, and the run reading those heads."""
    store = _store(ran)
    with FeatureStore.open(str(store), read_only=False) as s:
        (gen,) = keys_of(s.root, GENERATOR)
        del s.root[f"generators/{gen}"]
        synthetic = keys_of(s.root, SYNTHETIC)
        (run,) = keys_of(s.root, RUN)
        gone = {(GENERATOR, gen)} | {(SYNTHETIC, k) for k in synthetic}
        readers = [f"{kind.folder}/{k}" for kind in (ADAPTER, CACHE) for k in keys_of(s.root, kind)
                   if gone & set(input_refs(record_inputs(s, kind, k)))]
    real = _json(ran, "store", "gc")
    orphans = {r["path"] for r in real["removed"] if r["reason"] == "orphan"}
    assert orphans == {f"synthetic/{k}" for k in synthetic} | set(readers) | {f"runs/{run}"}
    assert readers and synthetic
    details = {r["path"]: r["detail"] for r in real["removed"]}
    assert details[f"synthetic/{synthetic[0]}"] == f"its input generator {gen[:12]} is gone"


def test_incomplete_artefacts_go_once_untouched_past_the_grace_period(ran: Path) -> None:
    store = _store(ran)
    with FeatureStore.open(str(store), read_only=False) as s:
        for key in ("1" * 64, "2" * 64):
            s.begin(Ref.of(ADAPTER, key), {"job": "adapter:x", "kind": "adapter", "key": key,
                                           "params": {}, "inputs": {}})
    old = time.time() - 7200
    os.utime(store / "adapters" / ("1" * 64) / "zarr.json", (old, old))
    out = _json(ran, "store", "gc", "--grace", "1h")
    assert [r["path"] for r in out["removed"]] == [f"adapters/{'1' * 64}"]
    assert out["removed"][0]["reason"] == "incomplete"
    assert out["removed"][0]["detail"] == "never committed; untouched for over 1.0h"
    assert out["within_grace"] == [f"adapters/{'2' * 64}"]
    assert (store / "adapters" / ("2" * 64)).exists()
    assert not (store / "adapters" / ("1" * 64)).exists()
    assert _json(ran, "store", "gc", "--grace", "0")["removed"][0]["path"] == \
        f"adapters/{'2' * 64}"


@pytest.mark.filterwarnings("error::UserWarning")  # zarr's about the temporary file: gc reports it
def test_old_records_versions_finished_checkpoints_rows_past_the_count_and_temp_files(
        ran: Path) -> None:
    store = _store(ran)
    with FeatureStore.open(str(store), read_only=False) as s:
        current = s.dataset_version("demo")
        assert current is not None
        old = "9" * 64
        s.write_dataset("demo", old, {"labels": np.zeros(3, np.int64)}, {},
                        {"job": "records:demo", "kind": "records", "key": old, "params": {},
                         "inputs": {}})
        s.root["datasets/demo"].attrs["current"] = current  # the new one stays current
        (gen,) = keys_of(s.root, GENERATOR)
        s.root.create_group(f"generators/{gen}/checkpoint_00002").create_array(
            "x", data=np.ones(100, np.float32))
        fp = s.extractor_fps()[0]
        table = s.root[f"extractors/{fp}/images"]
        rows = int(table.attrs["rows"])
        keys = table["keys"]
        keys.resize((rows + 64, keys.shape[1]))  # a killed append: written, never committed
        keys[rows:] = 7
    (store / "datasets" / "zarr.json.partial").write_bytes(b"{" * 10)
    files = _files(store)
    dry = _json(ran, "store", "gc", "--dry-run")
    real = _json(ran, "store", "gc")
    assert dry["removed"] == real["removed"]
    by = {r["reason"]: r for r in real["removed"]}
    assert set(by) == {"old-records", "checkpoint", "past-rows", "temporary"}
    assert by["old-records"]["path"] == f"datasets/demo/{old}"
    assert by["checkpoint"]["path"] == f"generators/{gen}/checkpoint_00002"
    assert by["past-rows"]["path"] == f"extractors/{fp}/images/keys"
    assert by["temporary"] == {"reason": "temporary", "path": "datasets/zarr.json.partial",
                               "kind": "file", "bytes": 10, "job": None,
                               "detail": "left by a killed write"}
    chunk = 32  # chunk_rows of the test manifest
    past = {k: b for k, b in files.items()
            if k.startswith(f"extractors/{fp}/images/keys/c/")
            and int(k.split("/")[-2]) >= -(-rows // chunk)}
    assert past and by["past-rows"]["bytes"] == sum(past.values())
    assert sum(files.values()) - sum(_files(store).values()) == real["bytes_freed"]
    with FeatureStore.open(str(store)) as s:
        assert s.root[f"extractors/{fp}/images/keys"].shape[0] == rows
        assert s.dataset_version("demo") == current
        assert "checkpoint_00002" not in s.root[f"generators/{gen}"]
    assert _recomputed(_json(ran, "run")) == []


def test_a_gc_killed_half_way_leaves_no_committed_artefact_with_missing_parts(ran: Path) -> None:
    """A removal un-commits first: what a killed gc leaves is incomplete (never read as
    committed), removed by the next gc whatever the grace period, or rebuilt by the next run."""
    store = _store(ran)
    with FeatureStore.open(str(store), read_only=False) as s:
        (run,) = keys_of(s.root, RUN)
        group = s.root[f"runs/{run}"]
        group.update_attributes({"collecting": True, "complete": False})  # gc's first step
        for member in list(group.keys())[:1]:
            del group[member]
        assert s.lookup(Ref.of(RUN, run)) is None
    out = _json(ran, "store", "gc")  # default grace: 24h, and the group is seconds old
    assert [(r["reason"], r["path"], r["detail"]) for r in out["removed"]] == [
        ("incomplete", f"runs/{run}", "left half-removed by a killed gc")]
    assert _recomputed(_json(ran, "run")) == ["run:demo"]  # the same key: the report stands


def test_gc_is_refused_on_a_published_store_and_while_another_writer_holds_the_lock(
        ran: Path, tmp_path: Path) -> None:
    store = _store(ran)
    with FeatureStore.open(str(store), read_only=False):
        result = invoke(ran, "store", "gc")
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "being written by another process" in \
        result.stderr
    published = tmp_path / "pub.zarr"
    assert invoke(ran, "store", "publish", str(store), str(published)).exit_code == 0
    files = _files(published)
    for args in (("store", "gc"), ("store", "gc", "--dry-run")):
        result = invoke(ran, "--store", str(published), *args)
        assert result.exit_code == 1, result.output
        assert "published store" in result.stderr and result.stderr.count("\n") == 1
    assert _files(published) == files


def test_a_bad_grace_period_is_one_line_and_durations_parse() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("24h") == 86400
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("12") == 12
    for bad in ("soon", "-1h", "h"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    result = CliRunner().invoke(app, ["store", "gc", "--grace", "soon"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --grace 'soon': expected a duration such as 90s, "
                                     "30m, 24h or 7d")


def test_every_input_a_planned_job_names_is_an_artefact_or_a_content_key() -> None:
    """gc follows inputs by name: a new input must be classed (an artefact kind to keep and
    check, or data read by content key), or gc would miss what it names."""
    from shipyard.stages.base import Environment
    from shipyard.stages.runner import Request, build_plan

    manifest = load_manifest(Path(__file__).parents[1] / "data_manifest.yaml")
    plan = build_plan(Environment(manifest, "cpu"), None, Request())
    stored = [job for job in plan.jobs.values() if job.kind is not REPORT]  # reports are files
    names = {name for job in stored for name in job.inputs}
    assert names <= set(INPUT_KINDS) | CONTENT_INPUTS | {"heads"}, names
    assert {"extractor", "text", "generator", "synthetic", "domain", "heads"} <= names
    refs = {kind.name for job in stored for kind, _ in input_refs(job.inputs)}
    assert refs == {"extractor", "text-set", "generator", "synthetic", "records", "adapter",
                    "cache"}


def test_store_info_lists_the_manifests_reports_with_the_run_each_reports(ran: Path) -> None:
    plan = {j["id"]: j["key"] for j in _json(ran, "run", "--dry-run")["jobs"]}
    (report,) = _json(ran, "store", "info")["reports"]
    assert report["path"] == str(ran.parent / "reports" / "m" / "demo.html")
    assert (report["key"], report["run"], report["run_in_store"]) == (
        plan["report:demo"], plan["run:demo"], True)
    assert report["bytes"] == (ran.parent / "reports" / "m" / "demo.html").stat().st_size
    with FeatureStore.open(str(_store(ran)), read_only=False) as s:
        del s.root[f"runs/{plan['run:demo']}"]
    (report,) = _json(ran, "store", "info")["reports"]
    assert report["run_in_store"] is False
    text = invoke(ran, "store", "info").stdout
    assert f"<- run {plan['run:demo'][:12]} (not in the store: the report outlived it)" in text
    # --store names one store alone: no manifest, so no reports
    assert _json(ran, "--store", str(_store(ran)), "store", "info")["reports"] == []


def test_before_the_manifests_artefact_is_built_the_jobs_newest_stays(ran: Path) -> None:
    """A template changed but not run yet: what the manifest plans does not exist, so nothing is
    superseded: the last results stay (and `status` can still say what changed)."""
    _template(ran, TEMPLATES[1])
    out = _json(ran, "store", "gc")
    assert out["removed"] == [] and out["kept"] > 0
    status = _json(ran, "status")
    assert any("params" in line or "input" in line for line in status["datasets"][0]["stale"])
