"""Recipes as the public codes run them: the per-dataset presets, the layers a setting is resolved
through, CoOp+SHIP's own optimiser and step counts, the learning-rate schedules at chosen steps
against torch's own schedulers, the Tip-Adapter search restricted to base-class val, and CoOp's
base-only softmax."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from shipyard.pipeline.configs import HeadConfig
from shipyard.pipeline.head_training import (
    WARMUP_LR,
    HeadData,
    epoch_batches,
    make_optimizer,
    step_lr,
    steps_per_epoch,
)
from shipyard.pipeline.heads import CoOp
from shipyard.pipeline.manifest import Manifest
from shipyard.pipeline.recipes import head_config, preset_of, ship_settings, tip_init, tip_scale
from shipyard.pipeline.registry import dataset_presets, find_preset, heads
from shipyard.pipeline.tip import tune_alpha_beta

# name -> (templates, [S_beta, S_alpha], init alpha, SYNC-CLIP epochs / WEIGHT / KLWEIGHT), from
# Tip-Adapter's configs/<dataset>.yaml, the templates of METHODS.md and SYNC-CLIP's configs.
ELEVEN = {
    "ImageNet": (["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                  "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                  "a photo of the small {}."], (7, 3), 1.17, (5, 0.5, 0.5)),
    "Caltech101": (["a photo of a {}."], (12, 5), 3, (20, 0.2, 0.5)),
    "OxfordPets": (["a photo of a {}, a type of pet."], (7, 3), 1.17, (10, 0.1, 0.5)),
    "StanfordCars": (["a photo of a {}."], (20, 10), 3, (20, 0.2, 0.5)),
    "Flowers102": (["a photo of a {}, a type of flower."], (50, 50), 10, (20, 1.0, 0.5)),
    "Food101": (["a photo of {}, a type of food."], (10, 10), 1.17, (5, 0.2, 0.5)),
    "FGVCAircraft": (["a photo of a {}, a type of aircraft."], (30, 30), 5, (10, 0.2, 2.0)),
    "SUN397": (["a photo of a {}."], (12, 10), 1.17, (5, 0.1, 0.1)),
    "DTD": (["{} texture."], (13, 13), 2, (10, 0.1, 1.0)),
    "EuroSAT": (["a centered satellite photo of {}."], (12, 10), 2, (10, 0.1, 3.5)),
    "UCF101": (["a photo of a person doing {}."], (7, 3), 3, (10, 0.1, 0.5)),
}


def manifest(*datasets: dict[str, Any], **sections: Any) -> Manifest:
    entries = [{"format": "coop", "root": "/images", "split_file": "/split.json", **d}
               for d in datasets]
    return Manifest.model_validate({"store": "/s.zarr", "model": {"name": "shipyard-tiny"},
                                    "datasets": entries, **sections},
                                   context={"base": Path("/")})


@pytest.mark.parametrize("name", sorted(ELEVEN))
def test_each_benchmark_dataset_gets_its_preset_by_name(name: str) -> None:
    templates, scale, alpha, sync = ELEVEN[name]
    m = manifest({"name": name})
    spec = m.datasets[0]
    assert spec.preset == name
    assert list(spec.templates) == templates
    assert tip_scale(m, spec) == (float(scale[0]), float(scale[1]))
    assert tip_init(m, spec) == (alpha, 1.0)
    for method in ("tip-adapter", "tip-adapter-f", "tip-adapter-f+ship"):
        assert (head_config(m, spec, method).alpha, head_config(m, spec, method).beta) == (alpha, 1)
    p = preset_of(spec).sync_clip
    assert (p["epochs"], p["weight"], p["kl_weight"]) == sync
    tip_f = 100 if name == "EuroSAT" else 20
    assert head_config(m, spec, "tip-adapter-f").epochs == tip_f
    assert head_config(m, spec, "tip-adapter-f+ship").epochs == tip_f
    assert head_config(m, spec, "coop").epochs == (50 if name == "ImageNet" else 200)
    variant, config, epochs = ship_settings(m, spec)
    assert (variant, epochs) == (("imagenet", 10) if name == "ImageNet" else ("default", 50))
    assert config.encoder_hidden == (4096 if name == "ImageNet" else 2048)


def test_the_presets_hold_exactly_the_eleven_datasets_and_a_default() -> None:
    assert set(dataset_presets()) == {*ELEVEN, "default"}


@pytest.mark.parametrize(("name", "preset"), [
    ("oxford_pets", "OxfordPets"), ("oxford-flowers", "Flowers102"), ("fgvc_aircraft",
     "FGVCAircraft"), ("EUROSAT", "EuroSAT"), ("stanford_cars", "StanfordCars"),
    ("imagenet", "ImageNet"), ("fashion-demo", None), ("default", None)])
def test_aliases_ignore_case_and_punctuation(name: str, preset: str | None) -> None:
    assert find_preset(name) == preset


def test_imagenet_runs_coop_plus_ship_on_adamw_for_twenty_epochs() -> None:
    m = manifest({"name": "imagenet"})
    cfg = head_config(m, m.datasets[0], "coop+ship")
    assert (cfg.optimizer, cfg.lr, cfg.epochs, cfg.weight_decay) == ("adamw", 1e-3, 20, 0.01)
    assert (cfg.batch_size, cfg.schedule, cfg.warmup_epochs) == (256, "step", 0)


def test_a_dataset_without_a_preset_keeps_the_defaults() -> None:
    m = manifest({"name": "fashion-demo", "templates": "a photo of a {}, a type of clothing."})
    spec = m.datasets[0]
    assert spec.preset == "none"
    assert tip_scale(m, spec) == (7.0, 3.0) and tip_init(m, spec) == (1.0, 1.0)
    assert ship_settings(m, spec)[0::2] == ("default", 50)
    # CoOp's registry default reads Dassl's views; a manifest without that recipe has only the
    # primary ones.
    assert head_config(m, spec, "coop") == replace(heads()["coop"].defaults, views="primary")


def test_an_explicit_preset_applies_to_any_name_and_none_turns_it_off() -> None:
    m = manifest({"name": "my-satellites", "preset": "eurosat"}, {"name": "EuroSAT",
                                                                  "preset": "none"})
    ours, plain = m.datasets
    assert ours.preset == "EuroSAT" and list(ours.templates) == ["a centered satellite photo of {}."]
    assert head_config(m, ours, "tip-adapter-f").epochs == 100
    assert plain.preset == "none" and list(plain.templates) == ["a photo of a {}."]
    assert head_config(m, plain, "tip-adapter-f").epochs == 20


def test_manifest_templates_win_over_the_preset() -> None:
    m = manifest({"name": "DTD", "templates": "a close-up of {}."})
    assert list(m.datasets[0].templates) == ["a close-up of {}."]


def test_an_unknown_preset_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown dataset preset 'imagenet-21k'"):
        manifest({"name": "x", "preset": "imagenet-21k"})


def test_layers_resolve_default_then_preset_then_manifest_then_dataset() -> None:
    m = manifest({"name": "EuroSAT", "tip_scale": [9, 4],
                  "overrides": {"tip-adapter-f+ship": {"lr": 0.005}}},
                 {"name": "DTD"},
                 heads={"tip_scale": [5, 2], "overrides": {"tip-adapter-f": {"epochs": 7, "lr": 0.003},
                                                          "coop": {"batch_size": 8}}},
                 ship={"epochs": 12})
    euro, dtd = m.datasets
    # the manifest's tip-adapter-f epochs beat EuroSAT's preset (100); a family setting applies to
    # its +ship variant; the dataset's own +ship setting applies to that variant only.
    assert head_config(m, euro, "tip-adapter-f").epochs == 7
    assert head_config(m, euro, "tip-adapter-f").lr == 0.003
    assert head_config(m, euro, "tip-adapter-f+ship").lr == 0.005
    assert head_config(m, euro, "tip-adapter-f+ship").epochs == 7
    assert head_config(m, euro, "tip-adapter-f").alpha == 2.0  # the preset's init survives
    assert tip_scale(m, euro) == (9.0, 4.0) and tip_scale(m, dtd) == (5.0, 2.0)
    # CoOp+SHIP keeps its own recipe except where the manifest names the family.
    ship = head_config(m, dtd, "coop+ship")
    assert (ship.batch_size, ship.momentum, ship.lr, ship.epochs) == (8, 0.0, 0.002, 200)
    assert ship_settings(m, dtd)[2] == 12


@pytest.mark.parametrize(("overrides", "message"), [
    ({"coop": {"schedule": "linear"}}, "coop.schedule: expected one of epoch, step"),
    ({"coop+ship": {"optimizer": "adam"}}, "coop+ship.optimizer: expected one of sgd, adamw"),
    ({"coop": {"batch_size": 0}}, "coop.batch_size: must be > 0"),
    ({"coop": {"drop_last": 1}}, "coop.drop_last: expected bool"),
    ({"zero-shot+ship": {"epochs": 1}}, "unknown value 'zero-shot+ship'"),
])
def test_bad_overrides_are_refused_by_name(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        manifest({"name": "d", "overrides": overrides})


# --- CoOp+SHIP's own recipe, the schedules ------------------------------------------------------

def test_coop_plus_ship_is_ships_run_coop_and_coop_is_dassls() -> None:
    ship = heads()["coop"].config(True)
    assert (ship.optimizer, ship.lr, ship.momentum, ship.weight_decay) == ("sgd", 0.002, 0.0, 0.0)
    assert (ship.batch_size, ship.epochs, ship.warmup_epochs, ship.schedule, ship.drop_last) == \
        (256, 200, 0, "step", False)
    coop = heads()["coop"].config(False)
    assert (coop.optimizer, coop.lr, coop.momentum, coop.weight_decay) == ("sgd", 0.002, 0.9, 5e-4)
    assert (coop.batch_size, coop.epochs, coop.warmup_epochs, coop.schedule, coop.drop_last) == \
        (32, 200, 1, "epoch", True)
    sgd = make_optimizer([torch.nn.Parameter(torch.zeros(2))], ship)
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.param_groups[0]["momentum"], sgd.param_groups[0]["weight_decay"]) == (0.0, 0.0)
    adamw = make_optimizer([torch.nn.Parameter(torch.zeros(2))], heads()["tip-adapter-f"].defaults)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["eps"] == 1e-4


@pytest.mark.parametrize(("size", "batch", "drop", "steps"), [
    (80, 32, True, 2), (80, 32, False, 3), (20, 32, True, 1), (64, 32, True, 2), (80, 256, False, 1),
    (512, 256, False, 2), (513, 256, False, 3)])
def test_steps_per_epoch(size: int, batch: int, drop: bool, steps: int) -> None:
    assert steps_per_epoch(size, batch, drop) == steps
    data = HeadData(torch.zeros(size, 0, 4), torch.zeros(size, 4), torch.zeros(size, dtype=torch.long),
                    torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    batches = epoch_batches(data, batch, torch.Generator().manual_seed(0), drop)
    assert len(batches) == steps
    assert sum(len(y) for _, y in batches) == (steps * batch if drop and size >= batch else size)


def test_the_step_schedule_is_torchs_cosine_annealing_over_all_steps() -> None:
    cfg = HeadConfig(epochs=3, lr=0.002, warmup_epochs=0, schedule="step")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * 5)
    for epoch in range(3):
        for step in range(5):
            assert step_lr(cfg, epoch, step, 5) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-15)
            opt.step()
            ref.step()
    assert step_lr(cfg, 1, 2, 5) == pytest.approx(0.5 * 0.002 * (1 + math.cos(math.pi * 7 / 15)))


def test_the_epoch_schedule_is_dassls_warmup_then_cosine() -> None:
    """Dassl: 1 epoch at 1e-5, then CosineAnnealingLR(T_max = epochs) whose first step happens at
    the end of the warm-up, so epoch e >= 1 trains at its e-th cosine value."""
    cfg = HeadConfig(epochs=200, lr=0.002, warmup_epochs=1, schedule="epoch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(cfg.epochs))
    assert step_lr(cfg, 0, 0, 3) == WARMUP_LR == 1e-5
    for epoch in range(1, 200):
        opt.step()
        cosine.step()  # the successor steps once per epoch after the warm-up
        for step in (0, 2):  # constant within an epoch
            assert step_lr(cfg, epoch, step, 3) == pytest.approx(opt.param_groups[0]["lr"],
                                                                 abs=1e-15)
    assert step_lr(cfg, 1, 0, 3) == pytest.approx(0.5 * 0.002 * (1 + math.cos(math.pi / 200)))
    no_warmup = HeadConfig(epochs=10, lr=0.1, warmup_epochs=0, schedule="epoch")
    assert step_lr(no_warmup, 0, 0, 1) == 0.1
    assert step_lr(no_warmup, 5, 0, 1) == pytest.approx(0.05)


# --- Tip-Adapter: base-class val only, the initial alpha/beta -----------------------------------

def _tip_problem() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    text = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    keys = F.normalize(text.repeat_interleave(4, 0) + 0.6 * torch.randn(24, 16, generator=g), dim=-1)
    labels = torch.arange(6).repeat_interleave(4)
    val_y = torch.arange(6).repeat_interleave(5)
    val = F.normalize(text[val_y] + 0.9 * torch.randn(30, 16, generator=g), dim=-1)
    return {"text": text, "keys": keys, "labels": labels, "val": val, "val_y": val_y}


def test_the_search_reads_base_val_only_and_ignores_new_class_keys() -> None:
    p, base = _tip_problem(), [0, 1, 2]
    got = tune_alpha_beta(p["keys"], p["labels"], p["val"], p["val_y"], p["text"], base,
                          (7.0, 3.0), (1.0, 1.0))
    b_val, b_keys = p["val_y"] < 3, p["labels"] < 3
    ref = tune_alpha_beta(p["keys"][b_keys], p["labels"][b_keys], p["val"][b_val],
                          p["val_y"][b_val], p["text"], base, (7.0, 3.0), (1.0, 1.0))
    assert got == ref
    scrambled = p["val"].clone()
    scrambled[~b_val] = -scrambled[~b_val]  # new-class val images changed: nothing moves
    keys = p["keys"].clone()
    keys[~b_keys] = F.normalize(torch.ones(16), dim=0)  # new-class (synthetic) keys changed
    assert tune_alpha_beta(keys, p["labels"], scrambled, p["val_y"], p["text"], base,
                           (7.0, 3.0), (1.0, 1.0)) == got


def test_without_val_images_the_initial_alpha_beta_are_kept() -> None:
    p = _tip_problem()
    none = p["val_y"] >= 3  # only new-class val: nothing of the base classes to tune on
    got = tune_alpha_beta(p["keys"], p["labels"], p["val"][none], p["val_y"][none], p["text"],
                          [0, 1, 2], (7.0, 3.0), (2.0, 1.5))
    assert (got["alpha"], got["beta"]) == (2.0, 1.5) and math.isnan(got["val_accuracy"])


def test_coop_baseline_trains_over_base_classes_and_scores_all(encoder: Any) -> None:
    names = ("shirt", "coat", "bag", "boot", "sandal")
    cfg = HeadConfig()
    head = CoOp(encoder, names, cfg, train_classes=3)
    f = F.normalize(torch.randn(4, encoder.embed_dim), dim=-1)
    head.train()
    train_logits = head(f)
    head.eval()
    eval_logits = head(f)
    assert train_logits.shape == (4, 3) and eval_logits.shape == (4, 5)
    torch.testing.assert_close(train_logits, eval_logits[:, :3], atol=1e-4, rtol=1e-5)
    everything = CoOp(encoder, names, cfg)
    everything.train()
    assert everything(f).shape == (4, 5)


def test_fresh_draws_differ_step_to_step_and_repeat_from_the_seed(encoder: Any) -> None:
    """CoOp+SHIP's synthetic half of each batch is sampled at that step (SHIP's run_coop): labels
    uniform over the new classes, new features every step, the same ones from the same seed."""
    from shipyard.pipeline.configs import ShipConfig
    from shipyard.pipeline.ship import ShipGenerator
    from shipyard.pipeline.synthesis import Synthesizer

    torch.manual_seed(0)
    gen = ShipGenerator(encoder, ShipConfig(latent_dim=16, encoder_hidden=32, generator_hidden=32))
    new_ids = [3, 4, 5]
    draw = Synthesizer(gen, ["bag", "boot", "sandal"]).drawer(new_ids)
    m, d = 40, encoder.embed_dim
    data = HeadData(torch.zeros(m, 0, d), F.normalize(torch.randn(m, d), dim=-1),
                    torch.randint(3, (m,)), torch.zeros(0, d), torch.zeros(0, dtype=torch.long),
                    mix="pair", draw=draw)

    def epoch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return epoch_batches(data, 16, torch.Generator().manual_seed(seed))

    first, again, other = epoch(7), epoch(7), epoch(8)
    assert [len(y) for _, y in first] == [32, 32, 16]  # each real batch gets as many synthetic
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    syn = [x[len(x) // 2:] for x, _ in first]
    assert not torch.allclose(syn[0], syn[1][:16])  # new samples at every step
    assert not torch.equal(first[0][0][16:], other[0][0][16:])  # the seed decides them
    labels = torch.cat([y[len(y) // 2:] for _, y in first])
    assert set(labels.tolist()) <= set(new_ids) and len(set(labels.tolist())) == 3
    torch.testing.assert_close(syn[0].norm(dim=-1), torch.ones(16))


# --- Tip-Adapter's cache keys -------------------------------------------------------------------

def test_raw_mean_keys_average_the_raw_views_as_tip_adapter_does() -> None:
    """Tip-Adapter (utils.py build_cache_model): the raw train features of each augment epoch are
    averaged, then normalized. SHIP's copy normalizes each view first: the unit-mean variant."""
    from shipyard.pipeline.heads import cache_keys

    unit = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, two views (1, 2, 2)
    norms = torch.tensor([[3.0, 1.0]])
    raw = cache_keys(unit, torch.zeros(1, 2), norms, "raw-mean")
    # by hand: mean of (3, 0) and (0, 1) = (1.5, 0.5); normalized = (3, 1) / sqrt(10)
    torch.testing.assert_close(raw, torch.tensor([[3.0, 1.0]]) / math.sqrt(10))
    shipcopy = cache_keys(unit, torch.zeros(1, 2), norms, "unit-mean")
    torch.testing.assert_close(shipcopy, torch.tensor([[1.0, 1.0]]) / math.sqrt(2))
    g = torch.Generator().manual_seed(0)
    views = F.normalize(torch.randn(5, 4, 8, generator=g), dim=-1)
    same = torch.full((5, 4), 2.5)  # equal norms: the two recipes agree
    torch.testing.assert_close(cache_keys(views, views[:, 0], same, "raw-mean"),
                               cache_keys(views, views[:, 0], same, "unit-mean"))
    clean = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    assert torch.equal(cache_keys(views[:, :0], clean, same[:, :0], "raw-mean"), clean)


def test_tip_heads_default_to_raw_mean_keys_and_unit_mean_is_a_setting() -> None:
    m = manifest({"name": "d", "overrides": {"tip-adapter-f+ship": {"keys": "unit-mean"}}})
    spec = m.datasets[0]
    assert head_config(m, spec, "tip-adapter").keys == "raw-mean"
    assert head_config(m, spec, "tip-adapter-f").keys == "raw-mean"
    assert head_config(m, spec, "tip-adapter-f+ship").keys == "unit-mean"
    with pytest.raises(ValueError, match="keys: expected one of raw-mean, unit-mean"):
        manifest({"name": "d", "overrides": {"tip-adapter": {"keys": "median"}}})


# --- the `paper` protocol: each code's own selection rule ---------------------------------------

def test_each_head_selects_as_its_public_code_does() -> None:
    from shipyard.pipeline.recipes import selection

    paper = manifest({"name": "d"}, heads={"protocol": "paper"})
    clean = manifest({"name": "d"})
    rules = {"zero-shot": None, "tip-adapter": None, "tip-adapter+ship": None,
             "coop": "last", "coop+ship": "best-generator-epoch", "tip-adapter-f": "best-epoch",
             "tip-adapter-f+ship": "best-epoch", "clip-adapter": "last", "linear-probe": "last",
             "clip-adapter+ship": "last", "linear-probe+ship": "last"}
    for method, rule in rules.items():
        assert selection(paper, method) == rule, method
        assert selection(clean, method) == (None if rule is None else "last"), method


@pytest.mark.parametrize(("epochs", "expected"), [
    (50, [10, 20, 30, 40, 50]), (10, [10]), (3, [3]), (25, [10, 20, 25]), (60, [10, 20, 30, 40,
                                                                               50, 60])])
def test_generator_epochs_are_every_tenth_and_the_last(epochs: int, expected: list[int]) -> None:
    from shipyard.pipeline.recipes import generator_epochs

    assert generator_epochs(epochs) == expected
