"""train-adapter, build-cache and evaluate as stages and commands: the whole pipeline on a small
demo, skipping, the paper protocol, approximate caches, and heads evaluated against the wrong
features or classes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
import zarr
from shipyard.cli import app
from shipyard.pipeline.artifacts import ADAPTER, CACHE, FOLDER_KINDS, RUN, Ref, keys_of
from shipyard.pipeline.store import FeatureStore
from typer.testing import CliRunner

from tests.conftest import copy_run, manifest_dict, run_once, write_manifest

FAST = {"coop": {"epochs": 3}, "tip-adapter-f": {"epochs": 3}, "linear-probe": {"epochs": 3},
        "clip-adapter": {"epochs": 3}}


def _data(small_demo: Path, store: Path, **heads: Any) -> dict[str, Any]:
    data = manifest_dict(small_demo, store)
    data["ship"] = {"epochs": 3, "synthesize": {"per_class": 4}}
    data["heads"] = {"overrides": FAST, **heads}
    data["datasets"][0]["seeds"] = [1]
    return data


def _manifest(tmp_path: Path, small_demo: Path, name: str = "m.yaml", **heads: Any) -> Path:
    return write_manifest(tmp_path / name, _data(small_demo, tmp_path / "s.zarr", **heads))


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def ran_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The whole pipeline, run once for the module; each test gets a copy of its store."""
    root = tmp_path_factory.mktemp("ran")
    return root, run_once(root, _data)


@pytest.fixture
def ran(ran_once: tuple[Path, str], tmp_path: Path, small_demo: Path) -> dict[str, Any]:
    path, out = copy_run(*ran_once, tmp_path, _data)
    return {"path": path, "out": out, "tmp": tmp_path}


def test_run_trains_every_head_and_reports(ran: dict[str, Any]) -> None:
    out = ran["out"]
    assert out["pipeline"] == ["extract", "train-generator", "synthesize", "train-adapter",
                               "build-cache", "evaluate", "report"]
    evaluation = out["stages"]["evaluate"]
    assert evaluation["protocol"] == "clean"
    assert "random weights" in evaluation["notes"][0]
    table = evaluation["datasets"][0]["table"]
    assert [r["method"] for r in table] == ["zero-shot", "coop", "coop+ship", "tip-adapter",
                                            "tip-adapter-f", "tip-adapter-f+ship"]
    by = {r["method"]: r for r in table}
    _zero_shot_row_recomputes(ran, by["zero-shot"])
    # No synthesized features: the cache holds no new class, so new-class logits are zero-shot's.
    assert by["tip-adapter"]["new"] == by["zero-shot"]["new"]
    assert by["tip-adapter-f"]["new"] == by["zero-shot"]["new"]
    report = Path(evaluation["datasets"][0]["report"])
    html = report.read_text()
    assert report.parent == ran["path"].parent / "reports" / ran["path"].stem
    assert "<svg" in html and "src=\"http" not in html and "coop+ship" in html
    with FeatureStore.open(str(ran["tmp"] / "s.zarr")) as store:
        assert store.lookup(Ref.of(RUN, evaluation["datasets"][0]["run"])) is not None
        assert len(keys_of(store.root, ADAPTER)) == 4  # coop, coop+ship, tip-f, tip-f+ship
        assert len(keys_of(store.root, CACHE)) == 1


def _zero_shot_row_recomputes(ran: dict[str, Any], row: dict[str, Any]) -> None:
    """The zero-shot row, recomputed by hand from the stored test features and text weights:
    base and new with the argmax over their own classes, GZSL over all, H = 2BN / (B + N)."""
    import numpy as np
    import torch
    from shipyard.pipeline.head_inputs import head_inputs
    from shipyard.pipeline.manifest_files import load_manifest

    with FeatureStore.open(str(ran["tmp"] / "s.zarr")) as store:
        inputs = head_inputs(store, store.extractor(store.extractor_fps()[0]),
                             load_manifest(ran["path"]).dataset("demo"), 1, torch.device("cpu"))
    logits = (inputs.test.features @ inputs.text.T).numpy()
    y = inputs.test.labels.numpy()

    def accuracy(side: list[int], among: list[int]) -> float:
        rows = np.isin(y, side)
        pred = np.asarray(among)[logits[rows][:, among].argmax(1)]
        return 100.0 * float(np.mean(pred == y[rows]))

    every = list(range(logits.shape[1]))
    want = {"base": accuracy(inputs.base, inputs.base), "new": accuracy(inputs.new, inputs.new),
            "gzsl_seen": accuracy(inputs.base, every), "gzsl_unseen": accuracy(inputs.new, every)}
    want["h"] = 2 * want["base"] * want["new"] / (want["base"] + want["new"])
    want["gzsl_h"] = 2 * want["gzsl_seen"] * want["gzsl_unseen"] / (want["gzsl_seen"] +
                                                                   want["gzsl_unseen"])
    for key, value in want.items():
        assert row[key] == pytest.approx(value, abs=1e-9), key


def test_second_run_skips_every_trained_artefact(ran: dict[str, Any]) -> None:
    again = json.loads(invoke("--manifest", str(ran["path"]), "run", "--json").stdout)
    stages = again["stages"]
    assert stages["extract"]["extracted"] == 0
    assert all(g["status"] == "up to date" for g in stages["train-generator"]["generators"])
    assert all(a["status"] == "up to date" for a in stages["train-adapter"]["adapters"])
    assert all(c["status"] == "up to date" for c in stages["build-cache"]["caches"])
    assert stages["evaluate"]["datasets"][0]["status"] == "up to date"
    first = ran["out"]["stages"]["evaluate"]["datasets"][0]["table"]
    assert stages["evaluate"]["datasets"][0]["table"] == first  # same heads, same numbers


def test_status_names_heads_not_trained_for_current_settings(ran: dict[str, Any],
                                                            small_demo: Path) -> None:
    status = json.loads(invoke("--manifest", str(ran["path"]), "status", "--json").stdout)
    assert status["up_to_date"] is True
    changed = _manifest(ran["tmp"], small_demo, name="changed.yaml",
                        overrides={**FAST, "coop": {"epochs": 4}})
    status = json.loads(invoke("--manifest", str(changed), "status", "--json").stdout)
    assert status["up_to_date"] is False
    assert status["datasets"][0]["stale"] == [
        "adapter:demo:seed1:coop: params.config.epochs 3 -> 4",
        "adapter:demo:seed1:coop+ship: params.config.epochs 3 -> 4",
        "run:demo: input heads changed",
        "report:demo: not written yet"]  # each manifest has its own reports folder


def test_approximate_cache_reports_its_agreement(ran: dict[str, Any]) -> None:
    result = invoke("--manifest", str(ran["path"]), "build-cache", "--index", "ivf", "--topk", "8",
                    "--json")
    assert result.exit_code == 0, result.output
    cache = json.loads(result.stdout)["caches"][0]
    agreement = cache["agreement"]
    assert agreement["topk"] == 8 and agreement["sample"] == 40  # the small demo's test split
    # Recomputed from the stored keys: top-8 IVF logits against the dense formula, argmax by argmax.
    import numpy as np
    import torch
    from shipyard.pipeline.cache_index import CacheIndex, cache_logits
    from shipyard.pipeline.head_inputs import head_inputs
    from shipyard.pipeline.manifest_files import load_manifest
    from shipyard.pipeline.tip import tip_logits
    from shipyard.pipeline.zarr_nodes import child_array, read_sealed

    with FeatureStore.open(str(ran["tmp"] / "s.zarr")) as store:
        group = store.lookup(Ref.of(CACHE, cache["cache"]))
        keys = read_sealed(child_array(group, "keys")).astype(np.float32)
        labels = read_sealed(child_array(group, "labels"))
        inputs = head_inputs(store, store.extractor(store.extractor_fps()[0]),
                             load_manifest(ran["path"]).dataset("demo"), 1, torch.device("cpu"))
    q, a, b = inputs.test.features, cache["alpha"], cache["beta"]
    approx = cache_logits(CacheIndex.build(keys, "ivf"), q, labels, inputs.text, a, b, topk=8)
    dense = tip_logits(q, torch.from_numpy(keys), torch.from_numpy(labels), inputs.text, a, b)
    same = (approx.argmax(1) == dense.argmax(1)).double().mean().item()
    assert agreement["top1_agreement"] == pytest.approx(same, abs=1e-12)


def test_paper_protocol_follows_each_codes_rule_and_says_so(tmp_path: Path,
                                                            small_demo: Path) -> None:
    """`paper`: CoOp keeps its last epoch (CoOp's code), Tip-Adapter-F its best test epoch
    (Tip-Adapter's main.py), CoOp+SHIP trains at generator epochs 10, 20 and keeps the best test
    H (SHIP's main_coop_vae.py); the table, the JSON and the report say which rule made each."""
    import numpy as np
    from shipyard.pipeline.artifacts import GENERATOR

    data = _data(small_demo, tmp_path / "s.zarr", protocol="paper",
                 methods=["zero-shot", "coop", "coop+ship", "tip-adapter-f"])
    data["ship"]["epochs"] = 20
    path = write_manifest(tmp_path / "m.yaml", data)
    result = invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    adapters = {a["method"]: a for a in out["stages"]["train-adapter"]["adapters"]}
    assert adapters["coop"]["selected_epoch"] == 3  # the last of FAST's 3 epochs
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    stored = {dict(g.attrs["record"])["params"]["head"] + ("+ship" if dict(
        g.attrs["record"])["params"]["mix"] else ""): g
        for g in (store.lookup(Ref.of(ADAPTER, k)) for k in keys_of(store.root, ADAPTER))}
    tip = dict(stored["tip-adapter-f"].attrs)
    scores = [e["select"] for e in tip["log"]]
    assert tip["selected_epoch"] == 1 + int(np.argmax(scores))  # the first best test H
    ship = dict(stored["coop+ship"].attrs)
    tried = ship["generator_selection"]
    assert [t["generator_epoch"] for t in tried] == [10, 20]
    hs = [t["test_h"] for t in tried]
    assert ship["selected_generator_epoch"] == tried[int(np.argmax(hs))]["generator_epoch"]
    assert "test" not in dict(stored["coop"].attrs["record"])["inputs"]  # the last epoch reads none
    assert "test" in dict(stored["coop+ship"].attrs["record"])["inputs"]
    (gen_key,) = keys_of(store.root, GENERATOR)
    generator = store.lookup(Ref.of(GENERATOR, gen_key))
    assert "snapshot_10" in generator and "snapshot_20" not in generator  # 20: the final weights
    evaluation = out["stages"]["evaluate"]
    assert evaluation["protocol"] == "paper"
    table = {r["method"]: r["selection"] for r in evaluation["datasets"][0]["table"]}
    assert table == {"zero-shot": None, "coop": "last", "coop+ship": "best-generator-epoch",
                     "tip-adapter-f": "best-epoch"}
    said = ("coop: last epoch; coop+ship: best test H over generator epochs; tip-adapter-f: best "
            "test H over epochs")
    assert evaluation["datasets"][0]["selection"] == said
    assert said in Path(evaluation["datasets"][0]["report"]).read_text()


def test_head_of_another_extractor_is_refused(ran: dict[str, Any], small_demo: Path) -> None:
    adapter = ran["out"]["stages"]["train-adapter"]["adapters"][0]["adapter"]
    data = manifest_dict(small_demo, ran["tmp"] / "s.zarr")
    data["model"]["init_seed"] = 9  # other weights: another extractor in the same store
    other = write_manifest(ran["tmp"] / "other.yaml", data)
    assert invoke("--manifest", str(other), "extract").exit_code == 0
    result = invoke("--manifest", str(other), "evaluate", "--adapter", adapter)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "was made from features of extractor" in lines[0]


def test_cache_for_other_classes_is_refused(ran: dict[str, Any], small_demo: Path) -> None:
    cache = ran["out"]["stages"]["build-cache"]["caches"][0]["cache"]
    split = json.loads((small_demo / "split.json").read_text())
    for rows in split.values():
        for row in rows:
            row[2] = "handbag" if row[2] == "bag" else row[2]
    (small_demo / "split.json").write_text(json.dumps(split))
    assert invoke("--manifest", str(ran["path"]), "extract").exit_code == 0
    result = invoke("--manifest", str(ran["path"]), "evaluate", "--cache", cache)
    assert result.exit_code == 2
    assert "was made for other classes than dataset demo's" in result.stderr


def test_train_adapter_rejects_unknown_synthetic_set(ran: dict[str, Any]) -> None:
    result = invoke("--manifest", str(ran["path"]), "train-adapter", "--method", "coop",
                    "--synthetic", "f" * 64)
    assert result.exit_code == 2
    assert "adapter:demo:seed1:coop+ship: no synthetic ffffffffffff in the store" in result.stderr


def test_status_reports_a_broken_dataset_and_still_shows_the_others(
        ran: dict[str, Any], small_demo: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(ran["path"].read_text())
    broken = dict(data["datasets"][0], name="broken", split_file=str(tmp_path / "missing.json"))
    data["datasets"].append(broken)
    path = write_manifest(tmp_path / "two.yaml", data)
    result = invoke("--manifest", str(path), "status", "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert [d["name"] for d in status["datasets"]] == ["demo"]
    assert status["datasets"][0]["stale"] == ["report:demo: not written yet"]  # two.yaml's own
    assert status["broken"][0]["name"] == "broken" and "not found" in status["broken"][0]["error"]
    assert status["up_to_date"] is False
    assert invoke("--manifest", str(path), "run").exit_code == 2  # run refuses, one line
    assert invoke("--manifest", str(path), "run", "--dataset", "demo").exit_code == 0


def test_a_deleted_report_is_stale_and_only_it_is_rewritten(ran: dict[str, Any]) -> None:
    report = Path(ran["out"]["stages"]["evaluate"]["datasets"][0]["report"])
    report.unlink()
    status = json.loads(invoke("--manifest", str(ran["path"]), "status", "--json").stdout)
    assert status["stale"] == ["report:demo"]
    plan = json.loads(invoke("--manifest", str(ran["path"]), "run", "--dry-run", "--json").stdout)
    assert [j["id"] for j in plan["jobs"] if j["state"] == "stale"] == ["report:demo"]
    again = json.loads(invoke("--manifest", str(ran["path"]), "run", "--json").stdout)
    assert [j["id"] for j in again["jobs"] if j["status"] != "up to date"] == ["report:demo"]
    assert report.is_file()


def test_force_recomputes_one_stage_and_reuses_the_rest(ran: dict[str, Any]) -> None:
    again = json.loads(invoke("--manifest", str(ran["path"]), "run", "--force", "build-cache",
                              "--json").stdout)
    assert {j["id"] for j in again["jobs"] if j["status"] != "up to date"} == {
        "cache:demo:seed1:tip-adapter"}
    first = ran["out"]["stages"]["build-cache"]["caches"][0]
    assert again["stages"]["build-cache"]["caches"][0]["cache"] == first["cache"]  # same key
    one = json.loads(invoke("--manifest", str(ran["path"]), "train-adapter", "--method", "coop",
                            "--force", "--json").stdout)
    assert [a["status"] for a in one["adapters"]] == ["built"]


def _keep_classes(small_demo: Path, labels: set[int]) -> None:
    split = json.loads((small_demo / "split.json").read_text())
    for name, rows in split.items():
        split[name] = [r for r in rows if r[1] in labels]
    (small_demo / "split.json").write_text(json.dumps(split))


def test_a_one_class_dataset_is_refused_in_one_line(tmp_path: Path, small_demo: Path) -> None:
    _keep_classes(small_demo, {0})
    path = _manifest(tmp_path, small_demo, methods=["zero-shot"])
    result = invoke("--manifest", str(path), "run")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: dataset demo: 1 class; base-to-new needs at least "
                                     "two (one base, one new)")
    assert not (tmp_path / "s.zarr").exists()


def test_a_side_with_one_class_is_warned_about_everywhere(tmp_path: Path, small_demo: Path) -> None:
    _keep_classes(small_demo, {0, 1, 2})  # base: 2 classes, new: 1
    path = _manifest(tmp_path, small_demo, methods=["zero-shot"])
    result = invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)["stages"]["evaluate"]["datasets"][0]
    warning = "the new side has a single class, so its accuracy is 100 by construction"
    assert evaluation["warnings"] == [warning]
    assert evaluation["table"][0]["new"] == 100.0
    assert "The new side has a single class" in Path(evaluation["report"]).read_text()
    assert f"warning: demo: {warning}" in invoke("--manifest", str(path), "evaluate").stdout


def test_a_report_that_fails_leaves_the_results_stored_and_printed(
        tmp_path: Path, small_demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shipyard.pipeline.report as report

    def broken(data: Any, path: Any) -> Path:
        raise ValueError("the renderer fell over\nsecond line")

    monkeypatch.setattr(report, "write_report", broken)
    path = _manifest(tmp_path, small_demo, methods=["zero-shot"])
    result = invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    evaluation = json.loads(result.stdout)["stages"]["evaluate"]["datasets"][0]
    assert evaluation["report_error"] == "ValueError: the renderer fell over"
    assert evaluation["report"] is None and evaluation["table"][0]["method"] == "zero-shot"
    status = json.loads(invoke("--manifest", str(path), "status", "--json").stdout)
    assert status["stale"] == ["report:demo"]  # the run itself is stored
    text = invoke("--manifest", str(path), "evaluate")
    assert text.exit_code == 1 and "the report could not be written" in text.stdout
    assert "zero-shot" in text.stdout


def test_without_a_val_split_the_unsearched_alpha_beta_are_said(tmp_path: Path,
                                                               small_demo: Path) -> None:
    """Nothing to search on: the cache keeps the dataset preset's initial alpha/beta (EuroSAT's
    Tip-Adapter config: 2 and 1), and every place the numbers appear says so."""
    split = json.loads((small_demo / "split.json").read_text())
    split.pop("val")
    (small_demo / "split.json").write_text(json.dumps(split))
    data = _data(small_demo, tmp_path / "s.zarr", methods=["zero-shot", "tip-adapter"])
    data["datasets"][0]["preset"] = "EuroSAT"
    path = write_manifest(tmp_path / "m.yaml", data)
    result = invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["stages"]
    cache = out["build-cache"]["caches"][0]
    assert (cache["alpha"], cache["beta"]) == (2.0, 1.0)
    warning = ("there is no val split, so Tip-Adapter's alpha and beta were not searched "
               "(the initial alpha 2, beta 1)")
    evaluation = out["evaluate"]["datasets"][0]
    assert evaluation["warnings"] == [warning]
    assert "There is no val split" in Path(evaluation["report"]).read_text()
    zero_shot_only = _manifest(tmp_path, small_demo, name="z.yaml", methods=["zero-shot"])
    again = json.loads(invoke("--manifest", str(zero_shot_only), "run", "--json").stdout)
    assert again["stages"]["evaluate"]["datasets"][0]["warnings"] == []  # nothing tunes on val


def test_ship_tip_heads_tune_on_the_seeds_base_class_val_subset(
        tmp_path: Path, small_demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The +SHIP Tip heads search alpha/beta on base-class val only: never a labelled new-class
    image. The val they read is the seed's Dassl val subset, min(K, 4) per class."""
    import shipyard.pipeline.tip as tip
    from shipyard.pipeline.datasets import Split, dassl_few_shot

    seen: list[tuple[list[int], list[int]]] = []
    real = tip.tune_alpha_beta

    def spy(keys: Any, key_labels: Any, val_feats: Any, val_labels: Any, *args: Any) -> Any:
        seen.append((val_labels.tolist(), sorted(set(key_labels.tolist()))))
        return real(keys, key_labels, val_feats, val_labels, *args)

    monkeypatch.setattr(tip, "tune_alpha_beta", spy)
    data = _data(small_demo, tmp_path / "s.zarr", methods=["tip-adapter+ship", "tip-adapter-f+ship"])
    data["datasets"][0]["shots"] = 2
    path = write_manifest(tmp_path / "m.yaml", data)
    result = invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    assert result.exit_code == 0, result.output
    assert len(seen) == 2  # the cache and the trained head
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    ds = store.dataset(data["datasets"][0]["name"])
    _train, val = dassl_few_shot(ds.labels(), ds.splits(), 2, 1, ds.keys())
    base_val = [int(y) for y in ds.labels()[val] if y in ds.base_labels]
    assert ds.attrs["sampler"] == "dassl" and (ds.splits()[val] == Split.VAL).all()
    for val_labels, key_classes in seen:
        assert val_labels == base_val  # 2 per base class (min(K, 4) = 2), in the sampler's order
        assert set(val_labels) == set(ds.base_labels)
        assert key_classes == list(range(len(ds.classnames)))  # synthetic new-class keys joined


def test_linear_probe_is_lpclip_fitted_on_base_shots_with_c_searched_on_base_val(
        tmp_path: Path, small_demo: Path) -> None:
    """The stored probe is exactly lpclip's fit on the clean base-class shots, C chosen on the
    seed's base-class val subset."""
    import torch
    from shipyard.pipeline.head_inputs import head_inputs
    from shipyard.pipeline.lpclip import search_logistic
    from shipyard.pipeline.manifest_files import load_manifest
    from shipyard.pipeline.records import Extractor
    from shipyard.pipeline.weights import load_tensors

    path = _manifest(tmp_path, small_demo, methods=["linear-probe"])
    result = invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["stages"]["train-adapter"]["adapters"][0]
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    m = load_manifest(path)
    (fp,) = store.extractor_fps()
    inputs = head_inputs(store, store.extractor(fp), m.datasets[0], 1, torch.device("cpu"))
    assert isinstance(store.extractor(fp), Extractor)
    fit = search_logistic(inputs.train.clean, inputs.train.labels, inputs.val.features,
                          inputs.val.labels, len(inputs.classnames))
    assert row["c"] == fit.c and row["val_accuracy"] == fit.val_accuracy
    (key,) = keys_of(store.root, ADAPTER)
    weights = load_tensors(store.lookup(Ref.of(ADAPTER, key)), "weights", torch.device("cpu"))
    torch.testing.assert_close(weights["weight"], fit.weight)
    torch.testing.assert_close(weights["bias"], fit.bias)


def test_a_stored_cache_holds_the_raw_average_of_the_stored_views(ran: dict[str, Any]) -> None:
    """build-cache's keys, recomputed by hand from the extractor's stored unit views and norms."""
    import numpy as np
    from shipyard.pipeline.records import fewshot_name
    from shipyard.pipeline.zarr_nodes import child_array, read_sealed

    store = FeatureStore.open(str(ran["tmp"] / "s.zarr"))
    (fp,) = store.extractor_fps()
    ex = store.extractor(fp)
    ds = store.dataset("demo")
    rows = ds.array(fewshot_name(4, 1))
    rows = rows[np.isin(ds.labels()[rows], ds.base_labels)]
    index = ex.view_table.index()
    at = np.array([index[k.tobytes()] for k in ds.keys()[rows]])
    unit = ex.view_table.read("features", at).astype(np.float32)  # (M, V, D)
    norms = ex.view_table.read("norms", at)  # (M, V)
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)  # as the loader re-normalizes float16
    mean = (unit * norms[..., None]).mean(axis=1)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    caches = [store.lookup(Ref.of(CACHE, k)) for k in keys_of(store.root, CACHE)]
    plain = next(g for g in caches if "synthetic" not in dict(g.attrs["record"])["inputs"])
    stored = read_sealed(child_array(plain, "keys"))
    np.testing.assert_allclose(stored, expected, atol=1e-5)


def test_store_info_lists_every_artefact_with_its_provenance(ran: dict[str, Any]) -> None:
    store_path = ran["tmp"] / "s.zarr"
    dry = json.loads(invoke("--manifest", str(ran["path"]), "run", "--dry-run", "--json").stdout)
    planned = {j["id"]: j["key"] for j in dry["jobs"] if j["id"].split(":")[0] in
               ("generator", "synthetic", "adapter", "cache", "run")}
    info = json.loads(invoke("--store", str(store_path), "store", "info", "--json").stdout)
    listed = {e["job"]: e for entries in info["listing"].values() for e in entries}
    assert {job: e["key"] for job, e in listed.items()} == planned  # each job's artefact, by key
    assert info["artifacts"] == {kind: len(v) for kind, v in info["listing"].items()}
    with FeatureStore.open(str(store_path), read_only=True) as store:
        for entries in info["listing"].values():
            for e in entries:
                kind = next(k for k in FOLDER_KINDS if k.name == e["kind"])
                group = store.lookup(Ref.of(kind, e["key"]))
                assert group is not None
                assert e["inputs"] == dict(group.attrs["record"])["inputs"]  # type: ignore[arg-type]
                assert e["complete"] and e["device"] == "cpu" and e["created"]
    adapter = next(e for e in info["listing"]["adapters"] if e["job"].endswith(":coop"))
    group = zarr.open_group(zarr.storage.LocalStore(store_path), mode="r+")
    group[f"adapters/{adapter['key']}"].attrs["complete"] = False  # a killed write
    info = json.loads(invoke("--store", str(store_path), "store", "info", "--json").stdout)
    assert not next(e for e in info["listing"]["adapters"] if e["key"] == adapter["key"])["complete"]
    text = invoke("--store", str(store_path), "store", "info").stdout
    assert f"{adapter['key'][:12]}  {adapter['job']} (incomplete)" in text
    assert "run:demo" in text


def test_a_classes_cache_scores_as_dense_and_its_stored_agreement_recomputes(
        ran: dict[str, Any]) -> None:
    """`heads.cache_index: classes` on the small demo: evaluate's numbers equal the flat (dense)
    cache's, and the agreement stored with the cache equals one recomputed from its arrays."""
    import numpy as np
    import torch
    from shipyard.pipeline.class_index import ClassIndex, tuning_queries
    from shipyard.pipeline.head_inputs import head_inputs
    from shipyard.pipeline.manifest_files import load_manifest
    from shipyard.pipeline.tip import tip_logits
    from shipyard.pipeline.zarr_nodes import child_array, read_sealed

    data = yaml.safe_load(ran["path"].read_text())
    data["heads"]["cache_index"] = "classes"
    path = write_manifest(ran["path"].with_name("classes.yaml"), data)
    result = invoke("--manifest", str(path), "run", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["stages"]
    dense = {r["method"]: r for r in ran["out"]["stages"]["evaluate"]["datasets"][0]["table"]}
    (evaluated,) = out["evaluate"]["datasets"]
    mine = {r["method"]: r for r in evaluated["table"]}
    for key in ("base", "new", "h", "gzsl_seen", "gzsl_unseen", "gzsl_h", "accuracy"):
        assert mine["tip-adapter"][key] == dense["tip-adapter"][key], key
    (cache,) = out["build-cache"]["caches"]
    stored = cache["agreement"]
    assert mine["tip-adapter"]["index"] == {"kind": "classes", **stored}
    assert evaluated["cache_notes"][0].startswith(
        f"tip-adapter: classes cache index, T = {stored['candidates']} candidate classes")

    manifest = load_manifest(path)
    with FeatureStore.open(str(ran["tmp"] / "s.zarr")) as store:
        group = store.lookup(Ref.of(CACHE, cache["cache"]))
        arrays = {n: torch.from_numpy(np.asarray(read_sealed(child_array(group, n))))
                  for n in ("keys", "labels", "offsets", "centroids", "counts", "owner")}
        inputs = head_inputs(store, store.extractor(store.extractor_fps()[0]),
                             manifest.dataset("demo"), 1, torch.device("cpu"))
    index = ClassIndex(arrays["keys"], arrays["offsets"], arrays["centroids"], arrays["counts"],
                       arrays["owner"])
    queries = tuning_queries(inputs.val.features, arrays["keys"])
    exact = tip_logits(queries, arrays["keys"], arrays["labels"], inputs.text, cache["alpha"],
                       cache["beta"]).numpy()
    for name, side in {"all": None, "base": inputs.base, "new": inputs.new}.items():
        approx = index.logits(queries, inputs.text, cache["alpha"], cache["beta"],
                              stored["candidates"], side).numpy()
        cols = np.arange(exact.shape[1]) if side is None else np.asarray(side)
        same = np.mean(approx[:, cols].argmax(1) == exact[:, cols].argmax(1))
        assert stored["scopes"][name] == pytest.approx(float(same), abs=1e-12), name
    assert stored["sample"] == len(queries) and stored["val"] == len(inputs.val.features)
    assert stored["top1_agreement"] == min(stored["scopes"].values()) >= 0.999

    status = json.loads(invoke("--manifest", str(path), "status", "--json").stdout)
    (listed,) = status["datasets"][0]["caches"]
    assert listed == {"id": "cache:demo:seed1:tip-adapter", "index": "classes",
                      "agreement": stored}
