"""SYNC-CLIP-FS (shipyard's feature-space variant): the head starts as CoOp, each loss reaches
what it should, the synthetic domain is the paired dataset (or SHIP's generator with +ship), and
the pipeline plans, trains, evaluates and labels it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from shipyard.cli import app
from shipyard.pipeline.configs import HeadConfig
from shipyard.pipeline.features import FewShotSet
from shipyard.pipeline.heads import CoOp, SyncClipFS
from shipyard.pipeline.sync_clip import DomainPool, FreshDomain, train_sync
from shipyard.pipeline.sync_losses import SyncWeights
from shipyard.pipeline.text_encoder import PromptEncoder
from typer.testing import CliRunner

from tests.conftest import manifest_dict, write_manifest

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
         "ankle boot")
FAST = {"sync-clip-fs": {"epochs": 2}}


def _shots(dim: int, classes: int = 5, per: int = 4) -> FewShotSet:
    g = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.normalize(torch.randn(classes * per, dim, generator=g), dim=-1)
    views = torch.nn.functional.normalize(torch.randn(classes * per, 2, dim, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(per)
    return FewShotSet(NAMES[:classes], labels, clean, views, "k",
                      clean_norms=torch.full((classes * per,), 3.0),
                      view_norms=torch.full((classes * per, 2), 2.0))


def _pool(dim: int) -> DomainPool:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(10).repeat_interleave(2)
    unit = torch.nn.functional.normalize(torch.randn(20, dim, generator=g), dim=-1)
    return DomainPool(unit, torch.full((20,), 5.0), labels)


def test_the_untrained_head_scores_as_coop(encoder: PromptEncoder, one_thread: None) -> None:
    cfg = HeadConfig(epochs=1, batch_size=4)
    head, coop = SyncClipFS(encoder, NAMES, cfg).eval(), CoOp(encoder, NAMES, cfg).eval()
    f = _shots(encoder.embed_dim).clean
    assert torch.allclose(head(f), coop(f), atol=1e-5)  # the adapters start as the identity
    raw = head.adapt(f, torch.full((len(f),), 3.0), synthetic=True)
    assert torch.allclose(raw, 3.0 * f)  # raw features rebuilt from the norms


def _train(encoder: PromptEncoder, weights: SyncWeights, domain: Any = None) -> tuple[SyncClipFS, Any]:
    torch.manual_seed(0)
    cfg = HeadConfig(epochs=2, batch_size=4, lr=0.05, warmup_epochs=0, weight_decay=0.0)  # decay moves all
    head = SyncClipFS(encoder, NAMES, cfg)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    out = train_sync(head, _shots(encoder.embed_dim), domain or _pool(encoder.embed_dim),
                     [5, 6, 7, 8, 9], cfg, weights)
    changed = {k for k, v in head.state_dict().items() if not torch.equal(v, before[k])}
    return head, (out, changed)


def test_without_the_synthetic_terms_the_synthetic_adapter_never_moves(encoder: PromptEncoder,
                                                                      one_thread: None) -> None:
    _head, (out, changed) = _train(encoder, SyncWeights(weight=0.0, kl_weight=0.0))
    assert not any(k.startswith("synthetic.") for k in changed)
    assert any(k.startswith("real.up") for k in changed) and "coop.ctx" in changed
    for entry in out["log"]:  # the total is L_real alone
        assert entry["loss"] == pytest.approx(entry["real"], rel=1e-5)


def test_each_synthetic_term_reaches_the_synthetic_adapter(encoder: PromptEncoder,
                                                           one_thread: None) -> None:
    for weights in (SyncWeights(weight=0.4, kl_weight=0.0), SyncWeights(weight=0.0, kl_weight=0.1)):
        _head, (out, changed) = _train(encoder, weights)
        assert any(k.startswith("synthetic.up") for k in changed), weights
    _head, (out, _changed) = _train(encoder, SyncWeights(weight=0.4, kl_weight=0.1))
    first = out["log"][0]
    assert first["loss"] == pytest.approx(first["real"] + 0.4 * first["syn"] + 0.1 * first["align"],
                                          rel=1e-4)


def test_a_fresh_domain_is_sampled_for_the_wanted_labels_at_the_given_norm(encoder: PromptEncoder,
                                                                          one_thread: None) -> None:
    asked: list[list[int]] = []

    def sample(labels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        asked.append(labels.tolist())
        return torch.randn(len(labels), encoder.embed_dim, generator=rng)

    unit, norms = FreshDomain(sample, 2.5).draw(torch.tensor([0, 3, 7]), torch.Generator())
    assert asked == [[0, 3, 7]] and torch.allclose(norms, torch.full((3,), 2.5))
    assert torch.allclose(unit.norm(dim=-1), torch.ones(3))
    _train(encoder, SyncWeights(), FreshDomain(sample, 2.5))
    for labels in asked[1:]:  # every step: the real batch's labels, then new classes only
        assert len(labels) == 8 and all(label >= 5 for label in labels[4:])
        assert all(label < 5 for label in labels[:4])


def _synthetic_folder(root: Path, per_class: int = 2) -> Path:
    folder = root / "syn"
    for cls in sorted((ROOT / "examples" / "fashion_synthetic").iterdir()):
        if cls.is_dir():
            (folder / cls.name).mkdir(parents=True)
            for png in sorted(cls.glob("*.png"))[:per_class]:
                shutil.copy2(png, folder / cls.name / png.name)
    return folder


def _data(tmp_path: Path, small_demo: Path, methods: list[str], synthetic: bool = True) -> dict[str, Any]:
    data = manifest_dict(small_demo, tmp_path / "s.zarr")
    data["datasets"][0]["seeds"] = [1]
    data["ship"] = {"epochs": 2, "synthesize": {"per_class": 2}}
    data["heads"] = {"methods": methods, "overrides": FAST}
    if synthetic:
        data["datasets"].append({"name": "demo-syn", "format": "imagefolder", "domain": "synthetic",
                                 "pairs_with": "demo", "root": str(_synthetic_folder(tmp_path))})
    return data


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_the_pipeline_trains_evaluates_and_labels_both_variants(tmp_path: Path, small_demo: Path,
                                                                one_thread: None) -> None:
    path = write_manifest(tmp_path / "m.yaml", _data(tmp_path, small_demo,
                                                     ["zero-shot", "sync-clip-fs", "sync-clip-fs+ship"]))
    dry = json.loads(invoke("--manifest", str(path), "run", "--dry-run", "--json").stdout)
    jobs = {j["id"]: j for j in dry["jobs"]}
    plain, ship = jobs["adapter:demo:seed1:sync-clip-fs"], jobs["adapter:demo:seed1:sync-clip-fs+ship"]
    assert "records:demo-syn" in plain["deps"] and "generator:demo:seed1" not in plain["deps"]
    assert "generator:demo:seed1" in ship["deps"] and "records:demo-syn" not in ship["deps"]
    result = invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    evaluation = out["stages"]["evaluate"]
    assert any("shipyard's own feature-space variant" in n for n in evaluation["notes"])
    table = {row["method"]: row for row in evaluation["datasets"][0]["table"]}
    assert {"sync-clip-fs", "sync-clip-fs+ship"} <= set(table)
    for method in ("sync-clip-fs", "sync-clip-fs+ship"):
        assert table[method]["base"] != table["zero-shot"]["base"] or \
            table[method]["new"] != table["zero-shot"]["new"] or \
            table[method]["seen"] != table["zero-shot"]["seen"]  # trained: something moved
    report = (tmp_path / "reports" / "m" / "demo.html").read_text()
    assert "own feature-space variant of SYNC-CLIP" in report


def test_new_synthetic_images_make_only_the_sync_head_stale(tmp_path: Path, small_demo: Path,
                                                            one_thread: None) -> None:
    path = write_manifest(tmp_path / "m.yaml", _data(tmp_path, small_demo, ["coop", "sync-clip-fs"]))
    assert invoke("--manifest", str(path), "--device", "cpu", "run", "--json").exit_code == 0
    before = json.loads(invoke("--manifest", str(path), "run", "--dry-run", "--json").stdout)
    assert {j["state"] for j in before["jobs"]} == {"up to date"}
    extra = tmp_path / "syn" / "bag" / "extra.png"
    shutil.copy2(next((ROOT / "examples" / "fashion_synthetic" / "bag").glob("gen_1*.png")), extra)
    dry = json.loads(invoke("--manifest", str(path), "run", "--dry-run", "--json").stdout)
    stale = {j["id"] for j in dry["jobs"] if j["state"] != "up to date"}
    assert "adapter:demo:seed1:sync-clip-fs" in stale
    assert "adapter:demo:seed1:coop" not in stale


def test_without_a_synthetic_domain_the_plain_variant_is_one_clear_error(tmp_path: Path,
                                                                        small_demo: Path) -> None:
    path = write_manifest(tmp_path / "m.yaml", _data(tmp_path, small_demo, ["sync-clip-fs"],
                                                     synthetic=False))
    result = invoke("--manifest", str(path), "run", "--dry-run")
    assert result.exit_code == 2
    assert "needs a synthetic-domain dataset paired with it" in result.output
    assert "sync-clip-fs+ship" in result.output
