"""`train-adapter`: a head (linear probe, CLIP-Adapter, CoOp, Tip-Adapter-F) trained on cached
base-class features, optionally with SHIP's synthesized new-class features.

Model code is imported inside `compute`: planning imports none."""

from __future__ import annotations

from typing import Any

from ..pipeline.artifacts import ADAPTER
from ..pipeline.manifest import Protocol
from ..pipeline.registry import head_config
from .base import Declared, Outcome, Scope, Slot, Stage, Work


def declare(slot: Slot) -> Declared | None:
    mine = slot.head("train-adapter")
    if mine is None:
        return None
    spec, ship = mine
    heads = slot.manifest.heads
    params: dict[str, Any] = {"head": spec.name, "mix": spec.ship if ship else None,
                              "config": head_config(spec.name, heads.overrides).to_dict(),
                              "protocol": heads.protocol.value}
    if spec.reads_val:
        params["tip_scale"] = list(heads.tip_scale)
    inputs, deps, requires = slot.head_inputs(spec, ship, heads.protocol)
    return Declared(params, inputs, deps, requires=requires)


def compute(work: Work) -> Outcome:
    import torch

    from ..pipeline.configs import HeadConfig
    from ..pipeline.head_inputs import head_inputs
    from ..pipeline.head_store import make_head, synthetic_features
    from ..pipeline.head_training import HeadData, train_head
    from ..pipeline.heads import TipAdapter
    from ..pipeline.tip import tune_alpha_beta
    from ..pipeline.weights import save_tensors

    job, env, store = work.job, work.env, work.store
    clip, device = env.clip, env.clip.device
    inputs = head_inputs(store, env.extractor(store), env.manifest.dataset(job.dataset),
                         int(job.seed or 0), device)
    inputs.check(job.inputs, job.id)
    method, cfg = job.params["head"], HeadConfig(**job.params["config"])
    syn = synthetic_features(store, job.inputs["synthetic"], inputs, device) \
        if "synthetic" in job.inputs else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = make_head(clip, inputs, method, cfg, syn).to(device)
    empty = torch.zeros(0, inputs.text.shape[1], device=device)
    data = HeadData(inputs.train.views, inputs.train.clean, inputs.train.labels,
                    syn[0] if syn else empty,
                    syn[1] if syn else torch.zeros(0, dtype=torch.long, device=device),
                    mix=job.params["mix"] or "join")
    select = test_h(inputs) if job.params["protocol"] == Protocol.PAPER.value else None
    out = train_head(head, data, cfg, select=select, progress=env.progress)
    tuned: dict[str, float] = {}
    if isinstance(head, TipAdapter):
        classes = inputs.base + (inputs.new if syn is not None else [])
        tuned = tune_alpha_beta(head.keys.detach(), head.key_labels, inputs.val.features,
                                inputs.val.labels, inputs.text, classes,
                                tuple(job.params["tip_scale"]))
        head.alpha, head.beta = tuned["alpha"], tuned["beta"]
    save_tensors(work.group, "weights", head.state_dict())
    last = out["log"][-1] if out["log"] else {}
    summary = {"synthetic": job.inputs.get("synthetic"), "epochs": cfg.epochs,
               "selected_epoch": out["selected_epoch"],
               "final_loss": round(float(last.get("loss", float("nan"))), 6), **tuned}
    attrs = {"log": out["log"], "selected_epoch": out["selected_epoch"],
             "classnames": list(inputs.classnames), **tuned}
    return Outcome(attrs, summary)


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
