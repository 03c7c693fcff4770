"""Data for the downstream tasks: registry datasets per task (phantoms among them), the
train / val / test splits, and seeded class-stratified label subsets.

Every item the fine-tuning loop sees has the dataset layer's keys: ``video`` (``[3,T,S,S]``, or
``[V,3,T,S,S]`` with ``view_valid [V]`` for AR), and the task's target: ``label`` (view, AS, AR
severe-or-not), ``severity`` (AR, 0-4), ``ef`` (percent) or ``masks`` + ``mask_valid``.
What a dataset feeds, and how a config's ``data`` section reads it, is the dataset's own
declaration (:mod:`EchoFMEngine.data.datasets`, phantoms in :mod:`EchoFMEngine.data.phantom`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import build_dataset, dataset_names
from ..data.datasets import dataset_layout, dataset_tasks
from ..data.labels import AR_BINARY, AR_SEVERE_FROM, AS_TASKS, TMED2_VIEWS
from ..data.phantom import (PROXY_LABELS, PROXY_NOTES, SPLIT_SEEDS, Phantoms,  # noqa: F401 (public here too)
                            ar_proxy_severity)
from ..data.phantom import VIEWS as PHANTOM_VIEWS  # noqa: F401 (public here too)
from ..data.phantom import task_items as phantom_task_items
from ..tasks import SEG_LABELS as _SEG_LABELS
from ..tasks import TASK_NAMES, get_task

SEG_LABELS = list(_SEG_LABELS)
EF_LABELS = ["ef_percent"]
# which data kinds can feed which fine-tuning task (the registry's DATASET_TASKS, pretraining left out)
KIND_TASKS = {name: tuple(t for t in dataset_tasks(name) if t in TASK_NAMES) for name in dataset_names()
              if any(t in TASK_NAMES for t in dataset_tasks(name))}


# ------------------------------------------------------------------ labels
def task_labels(task: str, data: dict) -> list[str]:
    """Names of the model's outputs for ``task`` fed by ``data`` (the config's data section)."""
    kind = data["kind"]
    if task == "segment":
        return SEG_LABELS[:2] if kind == "echonet" else SEG_LABELS
    if task == "ef":
        return list(EF_LABELS)
    own = dataset_layout(kind).task_classes(task)
    if own is not None:
        return own
    if task == "ar":
        return list(AR_BINARY)
    default = TMED2_VIEWS if task == "view" else AS_TASKS[_as_task(data)][0]
    if kind == "csv" and data.get("classes"):
        return [str(c) for c in data["classes"]]
    return list(default)


def _as_task(data: dict) -> str:
    name = data.get("as_task") or "as_presence"
    if name not in AS_TASKS:
        raise ValueError(f"data.as_task {name!r} is not one of {sorted(AS_TASKS)}")
    return name


# ------------------------------------------------------------------ registry
def task_layout(task: str, data: dict) -> type:
    """The dataset class of ``data.kind``, after checking that it feeds ``task`` and has the root it needs."""
    kind = data["kind"]
    if kind not in KIND_TASKS:
        raise ValueError(f"data.kind {kind!r} is not one of {sorted(KIND_TASKS)}")
    if task not in KIND_TASKS[kind]:
        raise ValueError(f"data.kind {kind!r} has no targets for task {task!r}; it serves {list(KIND_TASKS[kind])}")
    layout = dataset_layout(kind)
    if layout.needs_root and not data.get("root"):
        raise ValueError(f"data.root is required for data.kind {kind!r}")
    return layout


def registry_dataset(task: str, data: dict, split: str, frames: int, size: int) -> Dataset:
    """The registry dataset feeding ``task`` (errors from the dataset layer name the file / key)."""
    kind = data["kind"]
    opts: dict = {"frames": frames, "size": size, **task_layout(task, data).config_options(task, data, split)}
    if data.get("csv_file") and kind in ("tmed2", "csv", "ar_multiview"):
        opts["csv_file"] = data["csv_file"]
    if kind == "tmed2":
        opts["task"] = "view" if task == "view" else _as_task(data)
        if data.get("views"):
            opts["views"] = list(data["views"])
    elif kind == "camus" and data.get("views"):
        opts["views"] = list(data["views"])
    elif kind == "csv":
        column = label_column(task, data)
        if task in ("view", "as"):
            opts["classes"] = {column: task_labels(task, data)}
        elif task == "ef":
            opts["regression"] = [column]
    return build_dataset(kind, data.get("root"), split=split, **opts)


def label_column(task: str, data: dict) -> Optional[str]:
    """The CSV column of the task's target (``data.label_column``, else the task's name)."""
    if task == "segment":
        return None
    return data.get("label_column") or {"view": "view", "as": "as", "ef": "ef"}.get(task)


def target_key(task: str, data: dict) -> Optional[str]:
    """Item key holding the task's target ('label', 'ef', or a CSV regression column)."""
    if task in ("view", "as", "ar"):
        return "label"
    if task == "ef":
        return label_column(task, data) if data["kind"] == "csv" else "ef"
    return None


def index_targets(ds, task: str, data: dict) -> Optional[list]:
    """The target of every sample without reading videos, where the layout allows it (None: unknown).

    Classes are ints (-1: missing), values floats (nan: missing), segmentation 1 / None (no masks)."""
    if isinstance(getattr(ds, "items", None), list):
        ds = ds.items                          # a dataset made in memory (phantoms): its finished items
    if isinstance(ds, list):
        if task == "segment":
            return [1 if bool(it["mask_valid"].any()) else None for it in ds]
        return [it[target_key(task, data)] for it in ds]
    samples, name = getattr(ds, "samples", None), getattr(ds, "name", "")
    if samples is None:
        return None
    if name == "tmed2":
        return [int(s["label"]) for s in samples]
    if name == "csv":
        if task == "segment":                  # a clip whose masks are all excluded propagated ones has none
            drop = {"propagated"} if float(data.get("propagated_weight", 1.0)) == 0 else set()
            return [1 if s["mask"] and not set(s.get("mask_sources") or ["corrected"]) <= drop else None
                    for s in samples]
        return [s["targets"][label_column(task, data)] for s in samples]
    if name == "ar_multiview":
        return [int(float(s["severity"]) >= AR_SEVERE_FROM) for s in samples]
    if name == "echonet":
        if task == "segment":
            return [1 if len(ds.tracings.get(s["key"], {})) >= 2 else None for s in samples]
        return [float(s["ef"]) for s in samples]
    if name == "camus":
        if task == "segment":
            return [1] * len(samples)
        return [_float(s["info"].get("LVef", s["info"].get("EF"))) for s in samples]
    return None


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, (int, np.integer)) and v < 0)


def stratified_subset(targets: Sequence, fraction: float, seed: int) -> list[int]:
    """A seeded subset of ``fraction`` of the samples: per class (int targets) at least one sample
    and ``round(fraction * n_class)``; otherwise ``round(fraction * n)`` drawn at random. Sorted."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.label_fraction must lie in (0, 1], got {fraction}")
    n = len(targets)
    if fraction == 1.0:
        return list(range(n))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1ABE]))
    if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in targets):
        groups: dict = {}
        for i, t in enumerate(targets):
            groups.setdefault(int(t), []).append(i)
        keep = []
        for cls in sorted(groups):
            idx = groups[cls]
            k = max(1, int(round(fraction * len(idx))))
            keep += rng.choice(idx, size=k, replace=False).tolist()
        return sorted(keep)
    k = max(1, int(round(fraction * n)))
    return sorted(rng.choice(n, size=k, replace=False).tolist())


def carve_validation(targets: Sequence, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: a seeded, class-stratified ``fraction`` held out for validation
    (at least one sample; each class keeps at least one training sample)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_fraction must lie in (0, 1) when data.val_split is null, got {fraction}")
    n = len(targets)
    if n < 2:
        raise ValueError(f"cannot hold out a validation set from {n} training sample(s); give data.val_split")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7A1]))
    classes = all(isinstance(t, (int, np.integer)) for t in targets)
    groups: dict = {}
    for i, t in enumerate(targets):
        groups.setdefault(int(t) if classes else 0, []).append(i)
    val = []
    for idx in groups.values():
        k = min(len(idx) - 1, int(round(fraction * len(idx))))
        val += rng.choice(idx, size=k, replace=False).tolist() if k > 0 else []
    if not val:
        val = [int(rng.integers(n))]
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val)


# ------------------------------------------------------------------ splits
class TaskDataset(Dataset):
    """A view of a list of items or a registry dataset: chosen indices, items reduced to the keys
    the task needs (no ``meta``), the task's target under ``label`` / ``ef`` / ``severity``.

    Segmentation items also get ``mask_weight`` [T]: the loss weight of each labelled frame, 1, or
    ``data.propagated_weight`` where the dataset marks the frame's mask as propagated
    (``mask_propagated``); at weight 0 such frames are no longer labelled (``mask_valid`` False)."""

    KEEP = ("video", "label", "ef", "severity", "view_valid", "masks", "mask_valid", "spacing_mm")

    def __init__(self, base, task: str, data: dict, indices: Optional[Sequence[int]] = None):
        self.base, self.task = base, task
        self.key = target_key(task, data)
        self.propagated_weight = float(data.get("propagated_weight", 1.0))
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = self.base[self.indices[i]]
        out = {k: item[k] for k in self.KEEP if k in item}
        if self.key and self.key not in ("label", "ef") and self.key in item:
            out["ef"] = item[self.key]                  # a CSV regression column
        if isinstance(out.get("spacing_mm"), (list, tuple)):
            out["spacing_mm"] = tuple(float(s) for s in out["spacing_mm"])
        if self.task == "segment" and "mask_valid" in out:
            out.update(frame_weights(out["mask_valid"], item.get("mask_propagated"), self.propagated_weight))
        out["index"] = i
        return out

    def subset(self, positions: Sequence[int]) -> "TaskDataset":
        out = copy.copy(self)
        out.indices = [self.indices[p] for p in positions]
        return out


def frame_weights(valid: torch.Tensor, propagated: Optional[torch.Tensor], weight: float) -> dict:
    """``mask_valid`` and ``mask_weight`` [T] of one clip: labelled frames weigh 1, propagated ones
    ``weight``; weight 0 unlabels them (they are neither decoded, nor in the loss, nor scored)."""
    w = valid.float()
    if propagated is not None and bool(propagated.any()):
        propagated = propagated.bool() & valid
        w = torch.where(propagated, torch.full_like(w, weight), w)
        if weight == 0:
            valid = valid & ~propagated
    return {"mask_valid": valid, "mask_weight": w}


@dataclass
class TaskData:
    """The three splits of a fine-tuning run and what the checkpoint description needs."""

    train: TaskDataset
    val: TaskDataset
    test: Optional[TaskDataset]
    labels: list
    trained_on: str
    frames: int
    size: int
    frames_policy: str
    notes: list = field(default_factory=list)
    target_stats: dict = field(default_factory=dict)
    n_train_available: int = 0


def _with_targets(ds, task: str, data: dict, where: str) -> tuple[TaskDataset, Optional[list]]:
    """The samples of ``ds`` that have a target for ``task``; a clear error when none has."""
    targets = index_targets(ds, task, data)
    if targets is None:
        return TaskDataset(ds, task, data), None
    keep = [i for i, t in enumerate(targets) if not is_missing(t)]
    if not keep:
        raise ValueError(f"{where}: no sample has a target for task {task!r}"
                         + (f" (column {label_column(task, data)!r})" if data["kind"] == "csv" else ""))
    return TaskDataset(ds, task, data, keep), [targets[i] for i in keep]


def target_stats(values: Sequence[float]) -> dict:
    """Mean and SD (1 when undefined) of the training targets, which the regression head standardises by."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 and v.std() > 0 else 1.0}


def items_task_data(task: str, data: dict, train: Sequence[dict], val: Optional[Sequence[dict]] = None) -> TaskData:
    """Train (and validation) splits of items held in memory (the dataset layer's keys, model-sized
    ``video`` [3,T,S,S]), for :func:`EchoFMEngine.training.finetune.fit`; class names are the phantoms'."""
    if not train:
        raise ValueError("no training items")
    frames, size = int(train[0]["video"].shape[-3]), int(train[0]["video"].shape[-1])
    labels = task_labels(task, {**data, "kind": Phantoms.name}) if task != "segment" else list(SEG_LABELS)
    stats = target_stats([float(it["ef"]) for it in train]) if task == "ef" else {}
    val_ds = TaskDataset(list(val), task, data) if val else None
    return TaskData(TaskDataset(list(train), task, data), val_ds, None, labels, "items", frames, size,
                    get_task(task).frames_policy,
                    target_stats=stats, n_train_available=len(train))


def build_task_data(task: str, data: dict, frames: int, size: int, frame_model: bool = False) -> TaskData:
    """Train / val / test splits for ``task`` from the config's data section, at the model size.

    The dataset reads the splits its layout names (:meth:`EchoDataset.config_splits`; phantoms:
    ``n_train`` / ``n_val`` / ``n_test`` studies with disjoint seeds), by default the named splits;
    ``val_split: null`` holds out ``val_fraction`` of the training split (stratified);
    ``test_split: null`` skips the test set. ``label_fraction`` then keeps a seeded,
    class-stratified share of the training samples."""
    kind, seed = data["kind"], int(data["seed"])
    layout = task_layout(task, data)
    train_split, val_split, test_split = layout.config_splits(data)
    notes = list(layout.task_notes(task))
    where = f"{data['root']} ({kind})" if data.get("root") else kind
    base = registry_dataset(task, data, train_split, frames, size)
    train, train_t = _with_targets(base, task, data, f"{where} split {train_split!r}")
    if val_split:
        val = _with_targets(registry_dataset(task, data, val_split, frames, size), task, data,
                            f"{where} split {val_split!r}")[0]
    else:
        if train_t is None:
            train_t = [0] * len(train)
        tr, va = carve_validation(train_t, float(data["val_fraction"]), seed)
        val, train, train_t = train.subset(va), train.subset(tr), [train_t[i] for i in tr]
        notes.append(f"validation = {len(val)} samples held out of split {train_split!r} "
                     f"(val_fraction {data['val_fraction']}, seed {seed})")
    test = None
    if test_split:
        test = _with_targets(registry_dataset(task, data, test_split, frames, size), task, data,
                             f"{where} split {test_split!r}")[0]
    trained_on = kind
    n_available = len(train)
    fraction = float(data["label_fraction"])
    keep = stratified_subset(train_t if train_t is not None else [0.0] * len(train), fraction, seed)
    if fraction < 1.0:
        train = train.subset(keep)
        train_t = [train_t[i] for i in keep] if train_t is not None else None
        notes.append(f"label_fraction {fraction}: {len(train)} of {n_available} training samples (seed {seed})")
    labels = task_labels(task, data)
    stats = {}
    if task == "ef":
        stats = target_stats(train_t if train_t is not None else [float(train[i]["ef"]) for i in range(len(train))])
    policy = "still" if kind == "tmed2" else get_task(task).frames_policy  # TMED2 holds still images
    if frame_model:
        policy = "per_frame"
    return TaskData(train, val, test, labels, trained_on, frames, size, policy, notes, stats, n_available)
