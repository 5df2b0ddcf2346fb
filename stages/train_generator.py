"""`train-generator`: the SHIP generator on the base classes' K-shot features of a dataset."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import zarr

from pipeline.errors import UsageError
from pipeline.features import FewShotSet, fewshot_set, select_labels
from pipeline.fingerprint import fingerprint
from pipeline.generator_training import Checkpoint, TrainConfig, train_ship
from pipeline.manifest import DatasetSpec, Manifest, ShipVariant
from pipeline.progress import Progress, Silent
from pipeline.ship import ShipConfig, ShipGenerator
from pipeline.store import Extractor, FeatureStore, attrs_of, child_array, child_group
from pipeline.text_encoder import PromptEncoder
from pipeline.weights import flatten_optimizer, load_tensors, save_tensors, unflatten_optimizer
from stages.base import StageSpec
from stages.common import ModelContext, dataset_seeds, model_context, require_extractor

SPEC = StageSpec(
    name="train-generator",
    version=1,
    inputs=("extractors/<fp>/views", "datasets/<name>/fewshot"),
    params=("ship.variant", "ship.epochs", "ship.batch_size", "ship.lr", "ship.seed",
            "datasets[].shots", "seed"),
    outputs=("generators/<fp>",),
    summary="train the SHIP VAE (decoder: frozen CLIP text encoder) on base-class features",
)


@dataclass(frozen=True)
class TrainGeneratorOptions:
    datasets: tuple[str, ...] = ()  # empty: every dataset of the manifest
    seeds: tuple[int, ...] = ()  # few-shot seeds; empty: each dataset's seeds
    epochs: int | None = None  # overrides ship.epochs
    device: str = "auto"
    force: bool = False  # retrain even when an up-to-date generator exists


def ship_config(variant: ShipVariant) -> ShipConfig:
    return ShipConfig.imagenet() if variant is ShipVariant.IMAGENET else ShipConfig()


def train_config(manifest: Manifest, epochs: int | None = None) -> TrainConfig:
    s = manifest.ship
    return TrainConfig(epochs=epochs or s.epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed)


def generator_description(ctx: ModelContext, data: FewShotSet, dataset: str, shots: int, seed: int,
                          config: ShipConfig, train: TrainConfig) -> dict[str, Any]:
    """Everything that determines a generator; its sha256 names `generators/<fp>`."""
    return {"stage": SPEC.name, "version": SPEC.version, "extractor": ctx.extractor_fp,
            "train_set": data.content_key, "dataset": dataset, "shots": shots, "seed": seed,
            "classnames": list(data.classnames), "ship": config.to_dict(), "train": train.to_dict()}


def generator_inputs(store: FeatureStore, ex: Extractor, ctx: ModelContext, spec: DatasetSpec,
                     seed: int, config: ShipConfig,
                     train: TrainConfig) -> tuple[FewShotSet, dict[str, Any]]:
    """The base-class K-shot set a generator trains on, and the description that names it."""
    data = fewshot_set(store, ex, spec.name, spec.shots, seed, select_labels(store, spec.name, "base"),
                       ctx.clip.device)
    return data, generator_description(ctx, data, spec.name, spec.shots, seed, config, train)


def run(manifest: Manifest, opts: TrainGeneratorOptions,
        progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Silent()
    ctx = model_context(manifest, opts.device)
    config, train = ship_config(manifest.ship.variant), train_config(manifest, opts.epochs)
    results = []
    with FeatureStore.open(manifest.store, read_only=False, options=manifest.store_options) as store:
        ex = require_extractor(store, ctx)
        # Every input is checked before anything is trained or written.
        jobs = [(spec.name, seed, *generator_inputs(store, ex, ctx, spec, seed, config, train))
                for spec, seed in dataset_seeds(manifest, opts.datasets, opts.seeds)]
        for name, seed, data, desc in jobs:
            out = _train_one(store, ctx, data, desc, config, train, manifest, opts, progress)
            results.append({"dataset": name, "seed": seed, **out})
    return {"stage": SPEC.name, "extractor": ctx.extractor_fp, "device": str(ctx.clip.device),
            "generators": results}


def _train_one(store: FeatureStore, ctx: ModelContext, data: FewShotSet, desc: dict[str, Any],
               config: ShipConfig, train: TrainConfig, manifest: Manifest,
               opts: TrainGeneratorOptions, progress: Progress) -> dict[str, Any]:
    fp = fingerprint(desc)
    done = store.artifact("generators", fp)
    if done is not None and not opts.force:
        log = attrs_of(done)["log"]
        return {"generator": fp, "status": "up to date", "epochs_run": 0,
                "final": _final(log), "seconds": 0.0}
    started = time.perf_counter()
    group = store.artifact("generators", fp, complete=False)
    resume = None if group is None or opts.force else load_checkpoint(group, ctx.clip.device)
    if resume is None:
        group = store.create_artifact("generators", fp, desc)
    assert group is not None
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, caller's RNG untouched
        torch.manual_seed(train.seed)
        encoder = PromptEncoder.from_clip(ctx.clip)
        model = ShipGenerator(encoder, config)
    prompts = encoder.class_prompts(data.classnames, config.n_ctx)
    every = manifest.ship.checkpoint_every

    def checkpoint(state: Checkpoint) -> None:
        if state.epoch % every == 0 or state.epoch == train.epochs:
            save_checkpoint(group, state)

    log = train_ship(model, data, prompts, train, resume=resume, on_epoch=checkpoint,
                     progress=progress)
    save_tensors(group, "weights", model.state_dict())
    group.update_attributes({"log": log, "device": str(ctx.clip.device)})
    group.attrs["complete"] = True  # the commit: readers use the generator from here on
    _drop_checkpoints(group, keep=None)
    return {"generator": fp, "status": "resumed" if resume else "trained",
            "resumed_from_epoch": resume.epoch if resume else 0,
            "epochs_run": train.epochs - (resume.epoch if resume else 0),
            "final": _final(log), "seconds": round(time.perf_counter() - started, 3)}


def _final(log: list[dict[str, float]]) -> dict[str, float]:
    last = log[-1] if log else {}
    return {k: round(float(last[k]), 6) for k in ("loss", "recon", "kl") if k in last}


def save_checkpoint(group: zarr.Group, state: Checkpoint) -> None:
    """Write checkpoint_<epoch>, point `checkpoint` at it (the commit), drop older ones."""
    name = f"checkpoint_{state.epoch:05d}"
    sub = group.create_group(name, overwrite=True)
    save_tensors(sub, "model", state.model)
    tensors, meta = flatten_optimizer(state.optimizer)
    save_tensors(sub, "optimizer", tensors)
    sub.create_array("rng", data=state.rng.numpy(), chunks=state.rng.shape)
    sub.update_attributes({"epoch": state.epoch, "log": state.log, "optimizer": meta})
    group.attrs["checkpoint"] = name
    _drop_checkpoints(group, keep=name)


def load_checkpoint(group: zarr.Group, device: torch.device) -> Checkpoint | None:
    name = attrs_of(group).get("checkpoint")
    if not name or name not in group:
        return None
    sub = child_group(group, str(name))
    attrs = attrs_of(sub)
    optimizer = unflatten_optimizer(load_tensors(sub, "optimizer", device), attrs["optimizer"])
    rng = torch.from_numpy(child_array(sub, "rng")[...].copy())  # type: ignore[union-attr]
    return Checkpoint(int(attrs["epoch"]), load_tensors(sub, "model", device), optimizer, rng,
                      list(attrs["log"]))


def _drop_checkpoints(group: zarr.Group, keep: str | None) -> None:
    for name in list(group.group_keys()):
        if name.startswith("checkpoint_") and name != keep:
            del group[name]


def load_generator(store: FeatureStore, fp: str, ctx: ModelContext) -> ShipGenerator:
    """A trained generator from the store, on the model's device, in eval mode."""
    group = store.artifact("generators", fp)
    if group is None:
        raise UsageError(f"{store.location} has no trained generator {fp[:12]} "
                         "(run `shipyard train-generator`)")
    desc = attrs_of(group)["fingerprint"]
    if desc["extractor"] != ctx.extractor_fp:
        raise UsageError(f"generator {fp[:12]} was trained on extractor {desc['extractor'][:12]}, "
                         f"not on this manifest's {ctx.extractor_fp[:12]}")
    model = ShipGenerator(PromptEncoder.from_clip(ctx.clip), ShipConfig(**desc["ship"]))
    model.load_state_dict(load_tensors(group, "weights", ctx.clip.device))
    return model.eval()
