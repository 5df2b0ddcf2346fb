"""`train-generator`: the SHIP generator on the base classes' K-shot features of a dataset.

Model code is imported inside `compute`: planning (`status`, `run --dry-run`) imports none."""

from __future__ import annotations

from typing import Any

from ..pipeline.artifacts import GENERATOR
from ..pipeline.configs import TrainConfig
from ..pipeline.dataset_plan import require_planned
from ..pipeline.recipes import generator_epochs, needs_generator_snapshots, ship_settings
from .base import Declared, Outcome, Scope, Slot, Stage, Work


def declare(slot: Slot) -> Declared:
    ship = slot.manifest.ship
    assert slot.seed is not None  # a seed-scope stage
    _variant, config, epochs = ship_settings(slot.manifest, slot.spec)
    train = TrainConfig(epochs=slot.options.get("epochs") or epochs,
                        batch_size=ship.batch_size, lr=ship.lr, seed=ship.seed)
    # checkpoint_every is not a parameter: a resumed run ends where an uninterrupted one does.
    params: dict[str, Any] = {"ship": config.to_dict(), "train": train.to_dict(),
                              "shots": slot.spec.shots}
    if needs_generator_snapshots(slot.manifest):  # `paper`: CoOp+SHIP selects over them
        params["snapshots"] = generator_epochs(train.epochs)[:-1]
    return Declared(
        params=params,
        inputs={"extractor": slot.extractor, "train": slot.facts.train[slot.seed]},
        deps=(slot.upstream["extract"],))


def compute(work: Work) -> Outcome:
    import torch

    from ..pipeline.checkpoints import (
        Checkpoint,
        drop_checkpoints,
        load_checkpoint,
        save_checkpoint,
    )
    from ..pipeline.configs import ShipConfig
    from ..pipeline.features import fewshot_set
    from ..pipeline.generator_training import train_ship
    from ..pipeline.generators import snapshot_name
    from ..pipeline.ship import ShipGenerator
    from ..pipeline.text_encoder import PromptEncoder
    from ..pipeline.weights import save_tensors

    job, env, store, group = work.job, work.env, work.store, work.group
    spec, clip = env.manifest.dataset(job.dataset), env.clip
    ex = env.extractor(store)
    ds = store.dataset(job.dataset)
    data = fewshot_set(ds, ex, spec.shots, int(job.seed or 0), ds.base_labels, clip.device)
    require_planned(job.id, "train", data.content_key, job.inputs["train"])
    config, train = ShipConfig(**job.params["ship"]), TrainConfig(**job.params["train"])
    resume = load_checkpoint(group, clip.device) if work.resumed else None
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, caller's RNG untouched
        torch.manual_seed(train.seed)
        encoder = PromptEncoder.from_clip(clip)
        model = ShipGenerator(encoder, config)
    prompts = encoder.class_prompts(data.classnames, config.n_ctx)
    every = env.manifest.ship.checkpoint_every

    snapshots = set(job.params.get("snapshots", []))

    def checkpoint(state: Checkpoint) -> None:
        # The snapshot first: a checkpoint of this epoch implies its snapshot is whole.
        if state.epoch in snapshots:
            save_tensors(group, snapshot_name(state.epoch), state.model)
        if state.epoch % every == 0 and state.epoch < train.epochs:
            save_checkpoint(group, state)

    log = train_ship(model, data, prompts, train, resume=resume, on_epoch=checkpoint,
                     progress=env.progress)
    save_tensors(group, "weights", model.state_dict())
    drop_checkpoints(group, keep=None)  # before the commit: a committed generator has none
    start = resume.epoch if resume else 0
    summary = {"status": "resumed" if resume else "trained", "resumed_from_epoch": start,
               "epochs_run": train.epochs - start, "final": final_loss(log)}
    return Outcome({"log": log, "classnames": list(data.classnames)}, summary)


def final_loss(log: list[dict[str, Any]]) -> dict[str, float]:
    last = log[-1] if log else {}
    return {k: round(float(last[k]), 6) for k in ("loss", "recon", "kl") if k in last}


STAGE = Stage(name="train-generator", kind=GENERATOR, scope=Scope.SEED, declare=declare,
              compute=compute,
              summary="train the SHIP VAE (decoder: frozen CLIP text encoder) on base-class features")
