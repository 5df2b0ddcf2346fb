"""The artefact mechanism on its own (pipeline/artifacts.py): content keys, where each kind lives,
begin / resume / replace / commit, and the reasons `status` gives for a stale job."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from shipyard.pipeline import __version__, artifacts
from shipyard.pipeline.artifacts import (
    ADAPTER,
    CACHE,
    EXTRACTOR,
    FOLDER_KINDS,
    GENERATOR,
    KINDS,
    RECORDS,
    REPORT,
    RUN,
    SYNTHETIC,
    TEXT_SET,
    Draft,
    Kind,
    Ref,
    Slots,
    artifact_key,
    begin,
    commit,
    keys_of,
    lookup,
    partial,
    record_of,
)
from shipyard.pipeline.errors import StoreError, StoreReadOnlyError

KEY = "ab" * 32


@pytest.fixture
def root(tmp_path: Path) -> zarr.Group:
    return zarr.open_group(str(tmp_path / "s.zarr"), mode="w")


def _record(key: str = KEY, job: str = "adapter/demo/coop/1", **extra: Any) -> dict[str, Any]:
    return {"key": key, "job": job, **extra}


# ---- content keys ----------------------------------------------------------------------------

def test_a_key_is_the_sha256_of_the_canonical_json_of_kind_version_params_and_inputs() -> None:
    text = ('{"inputs":{"train":"k1"},"kind":"adapter","params":{"epochs":3,"lr":0.002},'
            '"version":1}')
    want = hashlib.sha256(text.encode()).hexdigest()
    assert artifact_key(ADAPTER, {"lr": 0.002, "epochs": 3}, {"train": "k1"}) == want


def test_a_changed_kind_version_parameter_or_input_names_another_artefact() -> None:
    base = artifact_key(ADAPTER, {"epochs": 3}, {"train": "k1"})
    assert artifact_key(ADAPTER, {"epochs": 3}, {"train": "k1"}) == base
    others = [
        artifact_key(Kind("adapter", 2, "adapters"), {"epochs": 3}, {"train": "k1"}),
        artifact_key(CACHE, {"epochs": 3}, {"train": "k1"}),
        artifact_key(ADAPTER, {"epochs": 4}, {"train": "k1"}),
        artifact_key(ADAPTER, {"epochs": 3}, {"train": "k2"}),
        artifact_key(ADAPTER, {"epochs": 3}, {"val": "k1"}),
        artifact_key(ADAPTER, {}, {"train": "k1"}),
    ]
    assert len({base, *others}) == len(others) + 1


# ---- kinds and where they live ---------------------------------------------------------------

def test_each_kind_has_its_folder_in_the_store_layout() -> None:
    folders = {k.name: k.folder for k in KINDS.values()}
    assert folders == {"extractor": "extractors", "text-set": "", "records": "", "generator":
                       "generators", "synthetic": "synthetic", "adapter": "adapters",
                       "cache": "caches", "run": "runs", "report": ""}
    assert all(k.version == 1 for k in KINDS.values())
    assert all(k.summary for k in KINDS.values())


def test_only_trainings_with_checkpoints_resume_an_interrupted_artefact() -> None:
    # SHIP generators and heads (SYNC-CLIP's prompts checkpoint every epoch).
    assert [k.name for k in KINDS.values() if k.resumable] == ["generator", "adapter"]


def test_folder_kinds_are_the_top_level_folders_other_than_extractors() -> None:
    assert FOLDER_KINDS == (GENERATOR, SYNTHETIC, ADAPTER, CACHE, RUN)
    assert EXTRACTOR not in FOLDER_KINDS and REPORT not in FOLDER_KINDS


def test_refs_place_each_kind() -> None:
    assert Ref.of(ADAPTER, KEY) == Ref(ADAPTER, KEY, f"adapters/{KEY}", None)
    assert Ref.text_set("ex1", KEY) == Ref(TEXT_SET, KEY, f"extractors/ex1/texts/{KEY}", None)
    assert Ref.records("demo", KEY) == Ref(RECORDS, KEY, f"datasets/demo/{KEY}", "datasets/demo")
    with pytest.raises(ValueError, match="kind text-set has no folder of its own"):
        Ref.of(TEXT_SET, KEY)


# ---- begin, lookup, partial, commit ----------------------------------------------------------

def test_an_artefact_is_invisible_until_committed(root: zarr.Group) -> None:
    ref = Ref.of(ADAPTER, KEY)
    assert lookup(root, ref) is None and partial(root, ref) is None
    draft = begin(root, ref, _record(), read_only=False)
    assert not draft.resumed
    assert dict(draft.group.attrs) == {"kind": "adapter", "key": KEY, "record": _record(),
                                       "complete": False}
    assert lookup(root, ref) is None
    assert partial(root, ref) is not None and partial(root, ref).path == f"adapters/{KEY}"
    commit(root, draft, {"classes": 10}, device="cpu")
    found = lookup(root, ref)
    assert found is not None and found.attrs["classes"] == 10
    assert partial(root, ref) is None


def test_a_path_through_an_array_or_an_absent_group_finds_nothing(root: zarr.Group) -> None:
    root.create_group("adapters").create_array(KEY, shape=(2,), dtype="f4")
    assert lookup(root, Ref.of(ADAPTER, KEY)) is None
    assert partial(root, Ref.of(ADAPTER, KEY)) is None
    assert lookup(root, Ref.text_set("missing", KEY)) is None


def test_provenance_counts_the_seconds_since_the_draft_began_to_the_millisecond(
        root: zarr.Group, monkeypatch: pytest.MonkeyPatch) -> None:
    group = root.create_group("g")
    monkeypatch.setattr(artifacts.time, "perf_counter", lambda: 11.23456)
    commit(root, Draft(Ref.of(RUN, KEY), group, False, started=10.0), {})
    assert group.attrs["provenance"]["seconds"] == 1.235


def test_commit_writes_provenance_then_the_complete_marker(root: zarr.Group) -> None:
    draft = begin(root, Ref.of(RUN, KEY), _record(), read_only=False)
    commit(root, draft, {"rows": 3}, device="cuda:0")
    attrs = dict(draft.group.attrs)
    prov = attrs.pop("provenance")
    assert attrs == {"kind": "run", "key": KEY, "record": _record(), "complete": True, "rows": 3}
    assert set(prov) == {"shipyard", "created", "device", "seconds", "resumed"}
    assert prov["shipyard"] == __version__ and prov["device"] == "cuda:0"
    assert prov["resumed"] is False and 0 <= prov["seconds"] < 60
    assert prov["created"][:2] == "20" and prov["created"].endswith("+00:00")


def test_the_complete_marker_is_the_last_write(root: zarr.Group) -> None:
    writes: list[str] = []

    class Attrs(dict):  # type: ignore[type-arg]
        def __setitem__(self, name: str, value: Any) -> None:
            writes.append(name)
            super().__setitem__(name, value)

    class Group:
        attrs = Attrs()

        def update_attributes(self, new: dict[str, Any]) -> None:
            writes.extend(sorted(new))

    draft = Draft(Ref.of(CACHE, KEY), Group(), False)  # type: ignore[arg-type]
    commit(root, draft, {"keys": 5})
    assert writes == ["keys", "provenance", "complete"]
    assert Group.attrs == {"complete": True}


def test_a_commit_moves_the_kinds_pointer_to_the_new_key(root: zarr.Group) -> None:
    for key in ("1" * 64, "2" * 64):
        draft = begin(root, Ref.records("demo", key), _record(key), read_only=False)
        commit(root, draft, {})
        assert root["datasets/demo"].attrs["current"] == key
    assert sorted(root["datasets/demo"].group_keys()) == ["1" * 64, "2" * 64]  # both kept


def test_a_kind_without_a_pointer_sets_none(root: zarr.Group) -> None:
    commit(root, begin(root, Ref.of(ADAPTER, KEY), _record(), read_only=False), {})
    assert "current" not in root["adapters"].attrs
    assert sorted(root.group_keys()) == ["adapters"]


def test_a_read_only_store_or_a_record_of_another_key_is_refused(root: zarr.Group) -> None:
    ref = Ref.of(ADAPTER, KEY)
    with pytest.raises(StoreReadOnlyError, match=f"cannot write adapter {KEY[:12]}: store is "
                                                 "read-only"):
        begin(root, ref, _record(), read_only=True)
    with pytest.raises(StoreError, match=f"adapter: record names key 'other', not {KEY}"):
        begin(root, ref, _record("other"), read_only=False)
    with pytest.raises(StoreError, match="record names key None"):
        begin(root, ref, {"job": "x"}, read_only=False)
    assert "adapters" not in root  # nothing was created


def _interrupted(root: zarr.Group, kind: Kind, record: dict[str, Any] | None = None) -> Ref:
    ref = Ref.of(kind, KEY)
    draft = begin(root, ref, record or _record(), read_only=False)
    draft.group.create_array("checkpoint", data=np.arange(3, dtype="f4"))
    return ref


def test_an_interrupted_generator_is_resumed_with_what_it_wrote(root: zarr.Group) -> None:
    ref = _interrupted(root, GENERATOR)
    draft = begin(root, ref, _record(), read_only=False)
    assert draft.resumed
    assert np.array_equal(draft.group["checkpoint"][:], [0, 1, 2])
    commit(root, draft, {})
    assert root[ref.path].attrs["provenance"]["resumed"] is True


@pytest.mark.parametrize("case", ["not resumable", "resume off", "another record key",
                                  "no record"])
def test_an_interrupted_artefact_is_otherwise_replaced_by_an_empty_group(
        root: zarr.Group, case: str) -> None:
    kind = CACHE if case == "not resumable" else GENERATOR
    ref = _interrupted(root, kind)
    if case == "another record key":
        root[ref.path].attrs["record"] = _record("other")
    if case == "no record":  # begun by a version that stored none
        del root[ref.path].attrs["record"]
    draft = begin(root, ref, _record(), read_only=False, resume=case != "resume off")
    assert not draft.resumed
    assert "checkpoint" not in draft.group and not list(draft.group.array_keys())
    assert draft.group.attrs["complete"] is False and draft.group.attrs["record"] == _record()


def test_a_committed_artefact_begun_again_is_replaced(root: zarr.Group) -> None:
    ref = Ref.of(GENERATOR, KEY)
    old = begin(root, ref, _record(), read_only=False)
    old.group.create_array("weights", data=np.ones(2, dtype="f4"))
    commit(root, old, {"epochs": 3})
    draft = begin(root, ref, _record(), read_only=False)
    assert not draft.resumed and "weights" not in draft.group
    assert lookup(root, ref) is None  # the old one is gone, the new one not yet committed


def test_a_linked_artefact_folder_is_never_replaced(tmp_path: Path, root: zarr.Group) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (tmp_path / "s.zarr" / "adapters").mkdir()
    os.symlink(outside, tmp_path / "s.zarr" / "adapters" / KEY)
    with pytest.raises(StoreError, match="symbolic link"):
        begin(root, Ref.of(ADAPTER, KEY), _record(), read_only=False)
    assert (outside / "keep.txt").read_text() == "mine"


# ---- reading records and keys ----------------------------------------------------------------

def test_record_of_is_a_copy_and_empty_without_a_record(root: zarr.Group) -> None:
    draft = begin(root, Ref.of(ADAPTER, KEY), _record(params={"a": 1}), read_only=False)
    rec = record_of(draft.group)
    assert rec == _record(params={"a": 1})
    rec["key"] = "changed"
    assert record_of(draft.group)["key"] == KEY
    assert record_of(root.create_group("plain")) == {}


def test_keys_of_lists_committed_and_interrupted_artefacts_sorted(root: zarr.Group) -> None:
    assert keys_of(root, ADAPTER) == [] and keys_of(root, TEXT_SET) == []
    for key in ("c" * 64, "a" * 64, "b" * 64):
        draft = begin(root, Ref.of(ADAPTER, key), _record(key), read_only=False)
        if key != "b" * 64:
            commit(root, draft, {})
    assert keys_of(root, ADAPTER) == ["a" * 64, "b" * 64, "c" * 64]
    assert keys_of(root, CACHE) == []


# ---- why a job is stale ----------------------------------------------------------------------

def _built(root: zarr.Group, kind: Kind, key: str, job: str | None, created: str,
           params: dict[str, Any], inputs: dict[str, Any], complete: bool = True) -> None:
    record = {"key": key, "params": params, "inputs": inputs, **({"job": job} if job else {})}
    draft = begin(root, Ref.of(kind, key), record, read_only=False)
    if complete:
        commit(root, draft, {})
        draft.group.attrs["provenance"] = {**draft.group.attrs["provenance"], "created": created}


def test_slots_keep_the_newest_committed_artefact_of_each_job(root: zarr.Group) -> None:
    _built(root, ADAPTER, "1" * 64, "j", "2026-01-02", {"epochs": 5}, {})
    _built(root, ADAPTER, "2" * 64, "j", "2026-01-01", {"epochs": 1}, {})
    _built(root, ADAPTER, "3" * 64, "j", "2026-01-03", {"epochs": 9}, {}, complete=False)
    _built(root, ADAPTER, "4" * 64, None, "2026-01-04", {"epochs": 7}, {})
    _built(root, CACHE, "5" * 64, "c", "2026-01-01", {"k": 1}, {})
    slots = Slots.scan(root)
    assert sorted(slots.by_job) == ["c", "j"]
    assert slots.by_job["j"]["created"] == "2026-01-02"
    assert slots.by_job["j"]["record"]["params"] == {"epochs": 5}
    assert sorted(Slots.scan(root, (CACHE,)).by_job) == ["c"]


def test_slots_take_the_later_of_two_artefacts_built_the_same_second(root: zarr.Group) -> None:
    _built(root, ADAPTER, "1" * 64, "j", "2026-01-02", {"epochs": 5}, {})
    _built(root, CACHE, "2" * 64, "j", "2026-01-02", {"epochs": 6}, {})  # scanned after
    assert Slots.scan(root, (ADAPTER, CACHE)).by_job["j"]["record"]["params"] == {"epochs": 6}
    assert Slots.scan(root, (CACHE, ADAPTER)).by_job["j"]["record"]["params"] == {"epochs": 5}


def test_an_artefact_without_a_creation_time_counts_as_the_oldest(root: zarr.Group) -> None:
    _built(root, ADAPTER, "1" * 64, "j", "2026-01-02", {"epochs": 5}, {})
    _built(root, CACHE, "2" * 64, "j", "2026-01-01", {"epochs": 6}, {})
    prov = dict(root[f"caches/{'2' * 64}"].attrs["provenance"])
    del prov["created"]
    root[f"caches/{'2' * 64}"].attrs["provenance"] = prov
    for order in ((ADAPTER, CACHE), (CACHE, ADAPTER)):
        assert Slots.scan(root, order).by_job["j"]["record"]["params"] == {"epochs": 5}


def test_why_reads_a_record_without_params_or_inputs_as_empty(root: zarr.Group) -> None:
    draft = begin(root, Ref.of(ADAPTER, KEY), {"key": KEY, "job": "j"}, read_only=False)
    commit(root, draft, {})
    assert Slots.scan(root).why("j", {"epochs": 3}, {"train": "k"}) == (
        "params.epochs None -> 3; input train changed")


def test_why_names_what_changed_since_the_last_build(root: zarr.Group) -> None:
    _built(root, ADAPTER, "1" * 64, "j", "2026-01-02",
           {"epochs": 3, "opt": {"lr": 0.1, "wd": 0}, "gone": 1}, {"train": "k1", "val": "v1"})
    slots = Slots.scan(root)
    assert slots.why("other", {}, {}) == "not built yet"
    assert slots.why("j", {"epochs": 5, "opt": {"lr": 0.1, "wd": 0}, "gone": 1},
                     {"train": "k1", "val": "v1"}) == "params.epochs 3 -> 5"
    assert slots.why("j", {"epochs": 3, "opt": {"lr": 0.2, "wd": 0}},
                     {"train": "k2", "val": "v1", "test": "t"}) == (
        "params.gone 1 -> None; params.opt.lr 0.1 -> 0.2; input test changed; input train changed")
    assert slots.why("j", {"epochs": 3, "opt": {"lr": 0.1, "wd": 0}, "gone": 1},
                     {"train": "k1"}) == "input val changed"
    assert slots.why("j", {"epochs": 3, "opt": 5, "gone": 1}, {"train": "k1", "val": "v1"}) == (
        "params.opt {'lr': 0.1, 'wd': 0} -> 5")
    assert slots.why("j", {"epochs": 3, "opt": {"lr": 0.1, "wd": 0}, "gone": 1},
                     {"train": "k1", "val": "v1"}) == "built under another key (kind version changed)"


def test_why_lists_at_most_four_changes_and_shortens_long_values(root: zarr.Group) -> None:
    _built(root, ADAPTER, "1" * 64, "j", "2026-01-02", {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}, {})
    assert Slots.scan(root).why("j", {"a": 2, "b": 2, "c": 2, "d": 2, "e": 2}, {}) == (
        "params.a 1 -> 2; params.b 1 -> 2; params.c 1 -> 2; params.d 1 -> 2")
    assert artifacts._short("x" * 38) == repr("x" * 38)  # 40 characters: kept whole
    assert artifacts._short("x" * 39) == "'" + "x" * 36 + "..."  # 41: cut to 37 and an ellipsis


def test_input_refs_name_the_artefacts_a_record_reads_and_nothing_else() -> None:
    from shipyard.pipeline.artifacts import input_refs

    inputs = {"extractor": "e" * 64, "train": "t" * 64, "val": "v" * 64, "test": "x" * 64,
              "views": "w" * 64, "text": ["a" * 64, "b" * 64], "generator": "g" * 64,
              "synthetic": "s" * 64, "domain": "d" * 64,
              "heads": {"zero-shot": {"kind": None, "keys": [None, None]},
                        "coop": {"kind": "adapter", "keys": ["c" * 64, None, "C" * 64]},
                        "tip-adapter": {"kind": "cache", "keys": ["k" * 64]},
                        "bare": {"kind": "adapter"}}}
    assert input_refs(inputs) == [
        (EXTRACTOR, "e" * 64), (TEXT_SET, "a" * 64), (TEXT_SET, "b" * 64),
        (GENERATOR, "g" * 64), (SYNTHETIC, "s" * 64), (RECORDS, "d" * 64),
        (ADAPTER, "c" * 64), (ADAPTER, "C" * 64), (CACHE, "k" * 64)]
    assert input_refs({"train": "t" * 64, "generator": None, "text": []}) == []
    assert input_refs({}) == []
