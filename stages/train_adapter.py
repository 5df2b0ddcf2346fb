"""`train-adapter`: a head (linear probe, CLIP-Adapter, CoOp, Tip-Adapter-F) trained on cached
base-class features, optionally with SHIP's synthesized new-class features."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from pipeline.errors import UsageError
from pipeline.fingerprint import fingerprint
from pipeline.head_config import HeadConfig, head_config
from pipeline.head_training import HeadData, train_head
from pipeline.heads import TipAdapter, build_head, cache_keys
from pipeline.manifest import Manifest, Protocol
from pipeline.metrics import base_new
from pipeline.progress import Progress, Silent
from pipeline.store import FeatureStore, attrs_of
from pipeline.text_encoder import PromptEncoder
from pipeline.weights import load_tensors, save_tensors
from stages.base import StageSpec
from stages.build_cache import tune_alpha_beta
from stages.common import ModelContext, dataset_seeds, model_context, require_extractor
from stages.head_inputs import (
    HeadInputs,
    checked_artifact,
    head_inputs,
    resolve_synthetic,
    synthetic_features,
)

SPEC = StageSpec(
    name="train-adapter",
    version=1,
    inputs=("extractors/<fp>", "datasets/<name>", "synthetic/<fp>"),
    params=("method", "heads.overrides", "heads.protocol", "synthetic", "seed"),
    outputs=("adapters/<fp>",),
    summary="train a head on real (+ synthesized) cached features",
)
TRAINED = ("linear-probe", "clip-adapter", "coop", "tip-adapter-f")


@dataclass(frozen=True)
class TrainAdapterOptions:
    method: str  # one of TRAINED
    synthetic: str = "none"  # none | auto | a synthetic set fingerprint
    datasets: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    device: str = "auto"
    force: bool = False


def run(manifest: Manifest, opts: TrainAdapterOptions,
        progress: Progress | None = None) -> dict[str, Any]:
    if opts.method not in TRAINED:
        raise UsageError(f"--method {opts.method}: expected one of {', '.join(TRAINED)}")
    ctx = model_context(manifest, opts.device)
    results = []
    with FeatureStore.open(manifest.store, read_only=False, options=manifest.store_options) as store:
        ex = require_extractor(store, ctx)
        for spec, seed in dataset_seeds(manifest, opts.datasets, opts.seeds):
            inputs = head_inputs(store, ex, spec, seed, ctx.clip.device)
            syn = resolve_synthetic(store, ctx, manifest, inputs, opts.synthetic)
            out = train_adapter(store, ctx, manifest, inputs, opts.method, syn, opts.force,
                                progress)
            results.append({"dataset": spec.name, "seed": seed, **out})
    return {"stage": SPEC.name, "method": opts.method, "adapters": results}


def adapter_description(ctx: ModelContext, inputs: HeadInputs, method: str, cfg: HeadConfig,
                        synthetic: str | None, protocol: Protocol) -> dict[str, Any]:
    return {"stage": SPEC.name, "version": SPEC.version, "extractor": ctx.extractor_fp,
            "inputs": inputs.key(), "dataset": inputs.dataset, "seed": inputs.seed,
            "method": method, "config": cfg.to_dict(), "synthetic": synthetic,
            "protocol": protocol.value, "classnames": list(inputs.classnames)}


def adapter_fp(ctx: ModelContext, manifest: Manifest, inputs: HeadInputs, method: str,
               synthetic: str | None) -> str:
    cfg = head_config(method, manifest.heads.overrides)
    return fingerprint(adapter_description(ctx, inputs, method, cfg, synthetic,
                                           manifest.heads.protocol))


def make_head(ctx: ModelContext, inputs: HeadInputs, method: str, cfg: HeadConfig,
              syn: tuple[torch.Tensor, torch.Tensor] | None) -> nn.Module:
    keys = cache_keys(inputs.train.views, inputs.train.clean)
    key_labels = inputs.train.labels
    if syn is not None and method.startswith("tip-adapter"):  # synthesized features join the cache
        keys, key_labels = torch.cat([keys, syn[0]]), torch.cat([key_labels, syn[1]])
    encoder = PromptEncoder.from_clip(ctx.clip) if method == "coop" else None
    return build_head(method, text=inputs.text, cfg=cfg, keys=keys, key_labels=key_labels,
                      encoder=encoder, classnames=inputs.classnames)


def train_adapter(store: FeatureStore, ctx: ModelContext, manifest: Manifest, inputs: HeadInputs,
                  method: str, synthetic: str | None, force: bool,
                  progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Silent()
    cfg = head_config(method, manifest.heads.overrides)
    protocol = manifest.heads.protocol
    desc = adapter_description(ctx, inputs, method, cfg, synthetic, protocol)
    fp = fingerprint(desc)
    done = store.artifact("adapters", fp)
    if done is not None and not force:
        return {"adapter": fp, "status": "up to date", "synthetic": synthetic,
                "selected_epoch": attrs_of(done)["selected_epoch"], "seconds": 0.0}
    started = time.perf_counter()
    device = ctx.clip.device
    syn = synthetic_features(store, synthetic, inputs, device) if synthetic else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = make_head(ctx, inputs, method, cfg, syn).to(device)
    empty = torch.zeros(0, inputs.text.shape[1], device=device)
    data = HeadData(inputs.train.views, inputs.train.clean, inputs.train.labels,
                    syn[0] if syn else empty,
                    syn[1] if syn else torch.zeros(0, dtype=torch.long, device=device),
                    mix="pair" if method == "coop" else "join")
    select = _test_h(inputs) if protocol is Protocol.PAPER else None
    out = train_head(head, data, cfg, select=select, progress=progress)
    tuned: dict[str, float] = {}
    if isinstance(head, TipAdapter):
        tuned = tune_alpha_beta(head.keys.detach(), head.key_labels, inputs,
                                manifest.heads.tip_scale, with_new=syn is not None)
        head.alpha, head.beta = tuned["alpha"], tuned["beta"]
    group = store.create_artifact("adapters", fp, desc)
    save_tensors(group, "weights", head.state_dict())
    group.update_attributes({"log": out["log"], "selected_epoch": out["selected_epoch"], **tuned})
    group.attrs["complete"] = True
    last = out["log"][-1] if out["log"] else {}
    return {"adapter": fp, "status": "trained", "synthetic": synthetic,
            "epochs": cfg.epochs, "selected_epoch": out["selected_epoch"],
            "final_loss": round(float(last.get("loss", float("nan"))), 6), **tuned,
            "seconds": round(time.perf_counter() - started, 3)}


def _test_h(inputs: HeadInputs) -> Any:
    """The `paper` protocol's selection score: H on the test set (what the public code does)."""

    @torch.no_grad()
    def score(head: nn.Module) -> float:
        h = float(base_new(head(inputs.test.features), inputs.test.labels, inputs.base,
                           inputs.new)["h"])
        return h if h == h else -1.0  # NaN (an empty split) never wins the selection

    return score


def load_adapter(store: FeatureStore, fp: str, ctx: ModelContext, inputs: HeadInputs) -> nn.Module:
    """A trained head, checked against this extractor and these classes."""
    attrs = checked_artifact(store, "adapters", fp, ctx, inputs)
    desc = attrs["fingerprint"]
    group = store.artifact("adapters", fp)
    assert group is not None  # checked_artifact found it
    cfg = replace(HeadConfig(), **desc["config"])
    syn = None
    if desc["synthetic"] and desc["method"].startswith("tip-adapter"):
        syn = synthetic_features(store, desc["synthetic"], inputs, ctx.clip.device)
    head = make_head(ctx, inputs, desc["method"], cfg, syn).to(ctx.clip.device)
    head.load_state_dict(load_tensors(group, "weights", ctx.clip.device))
    if isinstance(head, TipAdapter) and "alpha" in attrs:
        head.alpha, head.beta = float(attrs["alpha"]), float(attrs["beta"])
    return head.eval()
