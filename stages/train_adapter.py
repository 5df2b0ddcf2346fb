"""`train-adapter`: a head (linear probe, CLIP-Adapter, CoOp, Tip-Adapter-F, SYNC-CLIP-FS) trained
on cached base-class features, optionally with SHIP's synthesized new-class features (for
SYNC-CLIP-FS: a synthetic domain of every class).

Model code is imported inside `compute`: planning imports none."""

from __future__ import annotations

from typing import Any

from ..pipeline.artifacts import ADAPTER
from ..pipeline.configs import PromptDesign
from ..pipeline.identity import view_recipe_key
from ..pipeline.recipes import (
    SYNC_HEADS,
    TIP_HEADS,
    generator_epochs,
    head_config,
    selection,
    ship_settings,
    sync_weights,
    tip_scale,
)
from .base import Declared, Outcome, Scope, Slot, Stage, Work


def declare(slot: Slot) -> Declared | None:
    mine = slot.head("train-adapter")
    if mine is None:
        return None
    spec, ship = mine
    assert slot.method is not None
    config = head_config(slot.manifest, slot.spec, slot.method)
    rule = selection(slot.manifest, slot.method)
    explicit = bool(slot.options.get("synthetic"))
    if rule == "best-generator-epoch" and explicit:
        rule = "best-epoch"  # a named synthetic set: no generator to select over
    # The selection rule, not the protocol: a head whose rule is the same under both protocols
    # (CoOp's last epoch) is the same artefact under both.
    params: dict[str, Any] = {"head": spec.name, "mix": spec.ship if ship else None,
                              "config": config.to_dict(), "selection": rule}
    if rule == "best-generator-epoch":
        params["generator_epochs"] = generator_epochs(ship_settings(slot.manifest, slot.spec)[2])
    if spec.name in TIP_HEADS:
        params["tip_scale"] = list(tip_scale(slot.manifest, slot.spec))
    if spec.name in SYNC_HEADS:
        params["sync"] = sync_weights(slot.spec)
        if not ship and slot.domain is not None:
            params["domain"] = slot.domain[0].facts.name
    if spec.reads_images:  # the paper's SYNC-CLIP: its prompt shapes are part of what it is
        params["prompts"] = PromptDesign().to_dict()
    reads_test = rule in ("best-epoch", "best-generator-epoch")
    inputs, deps, requires = slot.head_inputs(spec, ship, reads_test)
    if config.views != "primary":  # another recipe's views: its key is an input
        inputs["views"] = view_recipe_key(slot.manifest.extraction, config.views)
    return Declared(params, inputs, deps, requires=requires)


def compute(work: Work) -> Outcome:
    import torch

    from ..pipeline.configs import HeadConfig
    from ..pipeline.head_inputs import head_inputs
    from ..pipeline.head_store import make_head, synthetic_features
    from ..pipeline.head_training import HeadData, train_head
    from ..pipeline.heads import LinearProbe, TipAdapter
    from ..pipeline.tip import tune_alpha_beta

    job, env, store = work.job, work.env, work.store
    clip, device = env.clip, env.clip.device
    inputs = head_inputs(store, env.extractor(store), env.manifest.dataset(job.dataset),
                         int(job.seed or 0), device, job.inputs.get("views", "primary"))
    inputs.check(job.inputs, job.id)
    method, cfg = job.params["head"], HeadConfig(**job.params["config"])
    if "prompts" in job.params:
        return train_prompted_head(work, inputs, cfg)
    if method in SYNC_HEADS:
        return train_sync_head(work, inputs, cfg)
    syn = synthetic_features(store, job.inputs["synthetic"], inputs, device) \
        if "synthetic" in job.inputs else None
    rule = job.params.get("selection")
    empty = torch.zeros(0, inputs.text.shape[1], device=device)

    def train(generator_epoch: int | None) -> tuple[Any, Any, dict[str, Any]]:
        """One head trained from its seeded initialisation (on the generator of one epoch)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            head = make_head(clip, inputs, method, cfg, syn, base_only=job.params["mix"] is None)
            head = head.to(device)
        draw = fresh_draws(work, inputs, generator_epoch) if "generator" in job.inputs else None
        data = HeadData(inputs.train.views, inputs.train.clean, inputs.train.labels,
                        syn[0] if syn else empty,
                        syn[1] if syn else torch.zeros(0, dtype=torch.long, device=device),
                        mix=job.params["mix"] or "join", draw=draw)
        select = test_h(inputs) if rule == "best-epoch" else None
        return head, data, train_head(head, data, cfg, select=select, progress=env.progress)

    tuned: dict[str, Any] = {}
    if rule == "best-generator-epoch":  # SHIP: CoOp at generator epochs 10, 20, ...; best test H
        score, best, tried = test_h(inputs), None, []
        for epoch in job.params["generator_epochs"]:
            trained = train(epoch)
            h = score(trained[0])
            tried.append({"generator_epoch": epoch, "test_h": h})
            if best is None or h > best[0]:  # strict: the first best, as SHIP's `H > best_H`
                best = (h, epoch, trained)
        assert best is not None
        head, data, out = best[2]
        tuned = {"selected_generator_epoch": best[1], "generator_selection": tried}
    else:
        head, data, out = train(None)
    if isinstance(head, LinearProbe):
        tuned |= fit_probe(head, data, inputs)
    if isinstance(head, TipAdapter):
        # Base-class val only, with or without synthetic keys (no new-class label is ever seen).
        tuned |= tune_alpha_beta(head.keys.detach(), head.key_labels, inputs.val.features,
                                 inputs.val.labels, inputs.text, inputs.base,
                                 tuple(job.params["tip_scale"]), (cfg.alpha, cfg.beta))
        head.alpha, head.beta = tuned["alpha"], tuned["beta"]
    synthetic = job.inputs.get("synthetic") or ("fresh" if "generator" in job.inputs else None)
    return trained_outcome(work, head, out, inputs, cfg, synthetic, tuned)


def trained_outcome(work: Work, head: Any, out: dict[str, Any], inputs: Any, cfg: Any,
                    synthetic: str | None, extra: dict[str, Any]) -> Outcome:
    """Store a trained head's weights; its attributes (the training log, the selected epoch, the
    classes, `extra`) and the command's summary of it."""
    from ..pipeline.weights import save_tensors

    save_tensors(work.group, "weights", head.state_dict())
    last = out["log"][-1] if out["log"] else {}
    summary = {"synthetic": synthetic, "epochs": cfg.epochs, "selected_epoch": out["selected_epoch"],
               "final_loss": round(float(last.get("loss", float("nan"))), 6), **extra}
    attrs = {"log": out["log"], "selected_epoch": out["selected_epoch"],
             "classnames": list(inputs.classnames), **extra}
    return Outcome(attrs, summary)


def train_sync_head(work: Work, inputs: Any, cfg: Any) -> Outcome:
    """SYNC-CLIP-FS: the real shots and a synthetic domain, either the paired synthetic dataset's
    images, a named stored synthetic set, or (+ship) SHIP's generator sampled for every class."""
    import torch

    from ..pipeline.dataset_plan import require_planned
    from ..pipeline.features import domain_images
    from ..pipeline.generators import load_generator
    from ..pipeline.head_store import make_head, synthetic_features
    from ..pipeline.heads import SyncClipFS
    from ..pipeline.sync_clip import DomainPool, FreshDomain, train_sync
    from ..pipeline.sync_losses import SyncWeights
    from ..pipeline.synthesis import Synthesizer

    job, env, store = work.job, work.env, work.store
    device = env.clip.device
    assert inputs.train.clean_norms is not None
    norm = float(inputs.train.clean_norms.mean())  # the raw scale of unit-only synthetic features
    domain: Any
    if "domain" in job.inputs:
        ds = store.dataset(job.params["domain"])
        require_planned(job.id, "domain", ds.version, job.inputs["domain"])
        domain = DomainPool(*domain_images(ds, env.extractor(store), device))
        source = f"dataset {job.params['domain']}"
    elif "generator" in job.inputs:
        generator = load_generator(store, job.inputs["generator"], env.clip, env.extractor_fp)
        synth = Synthesizer(generator, inputs.classnames)
        domain = FreshDomain(synth.fresh, norm)
        source = "fresh"
    else:
        features, labels = synthetic_features(store, job.inputs["synthetic"], inputs, device)
        domain = DomainPool(features, torch.full((len(labels),), norm, device=device), labels)
        source = job.inputs["synthetic"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = make_head(env.clip, inputs, job.params["head"], cfg, None).to(device)
    assert isinstance(head, SyncClipFS)
    out = train_sync(head, inputs.train, domain, inputs.new, cfg, SyncWeights(**job.params["sync"]),
                     env.progress)
    last = out["log"][-1] if out["log"] else {}
    outcome = trained_outcome(work, head, out, inputs, cfg, source, {
        "design": "shipyard's feature-space variant of SYNC-CLIP, not the paper's method"})
    outcome.summary["final_align"] = round(float(last.get("align", float("nan"))), 6)
    return outcome


def train_prompted_head(work: Work, inputs: Any, cfg: Any) -> Outcome:
    """The paper's SYNC-CLIP: deep prompts trained through the image encoder on the real shots'
    images and the paired synthetic dataset's, resumed from its last epoch checkpoint."""
    import numpy as np
    import torch

    from ..pipeline.checkpoints import (
        Checkpoint,
        drop_checkpoints,
        load_checkpoint,
        save_checkpoint,
    )
    from ..pipeline.dataset_plan import require_planned
    from ..pipeline.features import fewshot_rows
    from ..pipeline.head_store import make_head
    from ..pipeline.image_sets import read_rows
    from ..pipeline.sync_losses import SyncWeights
    from ..pipeline.sync_prompted import SyncImages, synthetic_pixels, train_prompted
    from ..pipeline.sync_prompts import SyncClip

    job, env, store, group = work.job, work.env, work.store, work.group
    clip, manifest = env.clip, env.manifest
    spec = manifest.dataset(job.dataset)
    max_pixels = manifest.extraction.max_pixels
    ds = store.dataset(job.dataset)
    rows = fewshot_rows(ds, spec.shots, int(job.seed or 0), inputs.base)
    real = read_rows(spec, ds, rows, max_pixels)
    domain = store.dataset(job.params["domain"])
    require_planned(job.id, "domain", domain.version, job.inputs["domain"])
    syn = read_rows(manifest.dataset(job.params["domain"]), domain, np.arange(len(domain)),
                    max_pixels)
    data = SyncImages(real, synthetic_pixels(syn, cfg.seed, clip.preprocess), syn.labels,
                      clip.preprocess)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, caller's RNG untouched
        torch.manual_seed(cfg.seed)
        head = make_head(clip, inputs, job.params["head"], cfg, None,
                         design=job.params["prompts"]).to(clip.device)
    assert isinstance(head, SyncClip)
    resume = load_checkpoint(group, clip.device) if work.resumed else None

    def checkpoint(state: Checkpoint) -> None:
        if state.epoch < cfg.epochs:
            save_checkpoint(group, state)

    out = train_prompted(head, data, len(inputs.base), inputs.new, cfg,
                         SyncWeights(**job.params["sync"]), resume, checkpoint, env.progress)
    drop_checkpoints(group, keep=None)  # before the commit: a committed head has none
    start = resume.epoch if resume else 0
    outcome = trained_outcome(work, head, out, inputs, cfg, f"dataset {job.params['domain']}",
                              {"prompt_depth": head.depths()})
    last = out["log"][-1] if out["log"] else {}
    outcome.summary.update({"final_align": round(float(last.get("align", float("nan"))), 6),
                            "resumed_from_epoch": start})
    return outcome


def fresh_draws(work: Work, inputs: Any, epoch: int | None = None) -> Any:
    """New-class features sampled at every step from the seed's generator (as it was after
    `epoch`, when given), on the device."""
    from ..pipeline.generators import load_generator
    from ..pipeline.synthesis import Synthesizer

    generator = load_generator(work.store, work.job.inputs["generator"], work.env.clip,
                               work.env.extractor_fp, epoch)
    synth = Synthesizer(generator, [inputs.classnames[i] for i in inputs.new])
    return synth.drawer(inputs.new)


def fit_probe(head: Any, data: Any, inputs: Any) -> dict[str, float]:
    """lpclip: logistic regression on the clean base-class shots (and any synthetic features
    that join them), C searched on base-class val; the fitted weights go into `head`."""
    import torch

    from ..pipeline.lpclip import search_logistic

    x, y = data.clean, data.labels
    if data.synthetic.shape[0]:
        x, y = torch.cat([x, data.synthetic]), torch.cat([y, data.synthetic_labels])
    fit = search_logistic(x, y, inputs.val.features, inputs.val.labels, len(inputs.classnames))
    with torch.no_grad():
        head.weight.copy_(fit.weight)
        head.bias.copy_(fit.bias)
    return {"c": fit.c, "val_accuracy": fit.val_accuracy}


def test_h(inputs: Any) -> Any:
    """The `paper` protocol's selection score: H on the test set (what the public code does)."""
    import torch

    from ..pipeline.metrics import base_new

    @torch.no_grad()
    def score(head: Any) -> float:
        h = float(base_new(head(inputs.test.features), inputs.test.labels, inputs.base,
                           inputs.new)["h"])
        return h if h == h else -1.0  # NaN (an empty split) never wins the selection

    return score


STAGE = Stage(name="train-adapter", kind=ADAPTER, scope=Scope.HEAD, declare=declare,
              compute=compute, summary="train a head on real (+ synthesized) cached features")
