"""Stored synthetic sets, heads and Tip-Adapter caches, read back and checked against the features
and classes they are used with: a head made from another extractor's features, or for other
classes, is refused with one line instead of scoring garbage."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from .artifacts import ADAPTER, CACHE, SYNTHETIC, Kind, Ref, record_of
from .cache_index import CacheIndex, cache_logits
from .class_index import ClassIndex
from .configs import HeadConfig, PromptDesign
from .errors import UsageError
from .head_inputs import HeadInputs
from .heads import TipAdapter, build_head, cache_keys
from .models import ClipModel
from .records import class_key
from .registry import heads
from .rows import RowTable
from .store import FeatureStore
from .sync_prompts import PromptedVision
from .text_encoder import PromptEncoder
from .weights import load_tensors
from .zarr_nodes import attrs_of, child_array, child_group, read_sealed, require_unit_rows


def read_synthetic(store: FeatureStore, key: str, classnames: list[str]) -> dict[str, np.ndarray]:
    """classname -> (per_class, D) float16 features, for classes present in `synthetic/<key>`."""
    group = store.lookup(Ref.of(SYNTHETIC, key))
    if group is None:
        raise UsageError(f"{store.location} has no synthetic set {key[:12]} "
                         "(run `shipyard synthesize`)")
    table = RowTable(child_group(group, "classes"), read_only=True)
    index = table.index()
    present = [c for c in classnames if class_key(c) in index]
    feats = table.read("features", np.array([index[class_key(c)] for c in present], np.int64))
    require_unit_rows(feats, f"synthetic set {key[:12]}")
    return dict(zip(present, feats, strict=True))


def synthetic_features(store: FeatureStore, key: str, inputs: HeadInputs,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthesized features of the dataset's new classes: (S, D) and their labels (S,)."""
    names = [inputs.classnames[i] for i in inputs.new]
    found = read_synthetic(store, key, names)
    absent = [n for n in names if n not in found]
    if absent:
        raise UsageError(f"synthetic set {key[:12]} lacks {len(absent)} new classes of "
                         f"{inputs.dataset} (e.g. {absent[0]!r}); run `shipyard synthesize`")
    feats = np.concatenate([found[n] for n in names]).astype(np.float32)
    labels = np.concatenate([np.full(len(found[n]), i)
                             for n, i in zip(names, inputs.new, strict=True)])
    return (F.normalize(torch.from_numpy(feats), dim=-1).to(device),
            torch.from_numpy(labels.astype(np.int64)).to(device))


def stored_head(store: FeatureStore, kind: Kind, key: str, extractor: str,
                inputs: HeadInputs, transfer: bool = False) -> zarr.Group:
    """A committed head or cache, refused unless it was made from this extractor's features for
    exactly this dataset's classes (with `transfer`, a head whose method transfers is evaluated
    on other classes)."""
    what = {ADAPTER.name: ("adapter", "train-adapter"), CACHE.name: ("cache", "build-cache")}
    noun, command = what[kind.name]
    group = store.lookup(Ref.of(kind, key))
    if group is None:
        raise UsageError(f"{store.location} has no {noun} {key[:12]} (run `shipyard {command}`)")
    made_from = record_of(group)["inputs"]["extractor"]
    if made_from != extractor:
        raise UsageError(f"{noun} {key[:12]} was made from features of extractor {made_from[:12]}, "
                         f"not this manifest's {extractor[:12]}")
    method = record_of(group)["params"].get("head", "")
    if transfer and kind is ADAPTER and method in heads() and heads()[method].transfers:
        return group
    if attrs_of(group).get("classnames") != list(inputs.classnames):
        raise UsageError(f"{noun} {key[:12]} was made for other classes than dataset "
                         f"{inputs.dataset}'s")
    return group


PROMPT_HEADS = ("coop", "sync-clip-fs", "sync-clip")  # heads that encode their own class prompts


def make_head(clip: ClipModel, inputs: HeadInputs, method: str, cfg: HeadConfig,
              syn: tuple[torch.Tensor, torch.Tensor] | None,
              base_only: bool = False, design: dict[str, int] | None = None) -> nn.Module:
    """The untrained model of a head method (its Tip-Adapter cache includes `syn` when given).
    `base_only`: CoOp trains with a softmax over the base classes alone (the baseline).
    `design`: SYNC-CLIP's prompt shapes, for the head that prompts the image tower too."""
    keys = cache_keys(inputs.train.views, inputs.train.clean, inputs.train.view_norms, cfg.keys)
    key_labels = inputs.train.labels
    if syn is not None and method.startswith("tip-adapter"):  # synthesized features join the cache
        keys, key_labels = torch.cat([keys, syn[0]]), torch.cat([key_labels, syn[1]])
    encoder = PromptEncoder.from_clip(clip) if method in PROMPT_HEADS else None
    vision = PromptedVision(clip.model.visual) if design is not None else None
    return build_head(method, text=inputs.text, cfg=cfg, keys=keys, key_labels=key_labels,
                      encoder=encoder, classnames=inputs.classnames,
                      train_classes=len(inputs.base) if base_only else None, vision=vision,
                      design=PromptDesign(**design) if design is not None else None)


def load_adapter(store: FeatureStore, key: str, clip: ClipModel, extractor: str,
                 inputs: HeadInputs, transfer: bool = False) -> nn.Module:
    """A trained head, checked against this extractor and these classes, in eval mode. With
    `transfer`, a head that transfers is rebuilt for these classes and takes the trained
    parameters (CoOp's context, CLIP-Adapter's adapter); its class-list buffers are this
    dataset's."""
    group = stored_head(store, ADAPTER, key, extractor, inputs, transfer)
    record, attrs = record_of(group), attrs_of(group)
    params = record["params"]
    cfg = replace(HeadConfig(), **params["config"])
    synthetic = record["inputs"].get("synthetic")
    syn = None
    if synthetic and params["head"].startswith("tip-adapter"):
        syn = synthetic_features(store, synthetic, inputs, clip.device)
    head = make_head(clip, inputs, params["head"], cfg, syn,
                     design=params.get("prompts")).to(clip.device)
    weights = load_tensors(group, "weights", clip.device)
    if transfer and attrs_of(group).get("classnames") != list(inputs.classnames):
        trained = dict(head.named_parameters())
        if set(trained) - set(weights):
            raise UsageError(f"adapter {key[:12]} lacks parameters {sorted(set(trained) - set(weights))}")
        weights = {k: v for k, v in weights.items() if k in trained}
        head.load_state_dict(weights, strict=False)
    else:
        head.load_state_dict(weights)
    if isinstance(head, TipAdapter) and "alpha" in attrs:
        head.alpha, head.beta = float(attrs["alpha"]), float(attrs["beta"])
    return head.eval()


class CachedTip(nn.Module):
    """Training-free Tip-Adapter answering through a stored cache: a FAISS index, or the classes
    index with its candidate count (whose candidates are picked within the scored classes)."""

    def __init__(self, index: CacheIndex | ClassIndex, labels: np.ndarray, text: torch.Tensor,
                 alpha: float, beta: float, topk: int | None, candidates: int | None = None) -> None:
        super().__init__()
        self.index, self.labels, self.text = index, labels, text
        self.alpha, self.beta, self.topk, self.candidates = alpha, beta, topk, candidates
        self.index_note: dict | None = None  # an approximate cache's stored agreement with dense

    @property
    def sided(self) -> bool:
        """Its answer within a set of classes needs logits of its own (`scoped`): the classes
        index picks its candidates there. A FAISS cache's logits serve every set alike."""
        return isinstance(self.index, ClassIndex)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scoped(f, None)

    def scoped(self, f: torch.Tensor, classes: list[int] | None) -> torch.Tensor:
        """Logits (B, C) whose argmax over `classes` (all when None) is the cache's answer there."""
        if isinstance(self.index, ClassIndex):
            assert self.candidates is not None
            return self.index.logits(f, self.text, self.alpha, self.beta, self.candidates, classes)
        return cache_logits(self.index, f, self.labels, self.text, self.alpha, self.beta,
                            topk=self.topk)


def load_cache(store: FeatureStore, key: str, extractor: str, inputs: HeadInputs) -> CachedTip:
    """A stored Tip-Adapter cache. Its index is rebuilt from the stored keys: a shared store is
    untrusted input, and FAISS trusts the sizes inside serialized bytes (a crafted one makes it
    allocate gigabytes), so the stored `index` bytes are never deserialized here. A classes
    index is read from plain arrays, checked against its keys."""
    group = stored_head(store, CACHE, key, extractor, inputs)
    attrs, params = attrs_of(group), record_of(group)["params"]
    keys = read_sealed(child_array(group, "keys")).astype(np.float32)
    labels = read_sealed(child_array(group, "labels"))
    classes = len(inputs.classnames)
    if keys.ndim != 2 or keys.shape[1] != inputs.text.shape[1] or len(labels) != len(keys) or \
            (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes):
        raise UsageError(f"cache {key[:12]}: {len(labels)} labels for keys of shape {keys.shape}, "
                         f"or labels outside its {classes} classes; run `shipyard store verify`")
    alpha, beta = float(attrs["alpha"]), float(attrs["beta"])
    if params["index"] != "classes":
        tip = CachedTip(CacheIndex.build(keys, params["index"]), labels, inputs.text, alpha, beta,
                        params["topk"])
    else:
        index = _class_index(group, key, keys, labels, classes).to(inputs.text.device)
        candidates = attrs.get("candidates")
        if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1:
            raise UsageError(f"cache {key[:12]}: candidate count {candidates!r} is not a positive "
                             f"integer; run `shipyard store verify`")
        tip = CachedTip(index, labels, inputs.text, alpha, beta, None, candidates)
    if attrs.get("agreement"):
        tip.index_note = {"kind": params["index"], **attrs["agreement"]}
    return tip


def _class_index(group: zarr.Group, key: str, keys: np.ndarray, labels: np.ndarray,
                 classes: int) -> ClassIndex:
    parts = {name: torch.from_numpy(np.asarray(read_sealed(child_array(group, name))))
             for name in ("offsets", "centroids", "counts", "owner")}
    try:
        index = ClassIndex(torch.from_numpy(keys), parts["offsets"].long(),
                           parts["centroids"].float(), parts["counts"].float(),
                           parts["owner"].long())
    except UsageError as exc:
        raise UsageError(f"cache {key[:12]}: {exc}; run `shipyard store verify`") from None
    if index.n_classes != classes or not np.array_equal(index.labels().numpy(), labels):
        raise UsageError(f"cache {key[:12]}: its class offsets do not match its {classes} classes "
                         f"and grouped labels; run `shipyard store verify`")
    return index
