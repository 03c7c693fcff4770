"""Evaluation inputs: a ``--data`` spec -> batches of model-ready cases, and the files left out.

Specs: ``NAME:ARG`` for the dataset registry (:func:`EchoFMEngine.data.build_dataset`) at the
checkpoint's frames and size; ARG is the dataset's root, or what its layout says it is
(:meth:`EchoDataset.from_spec`): ``phantom:N`` is N held-out phantom studies drawn with
:data:`HELD_OUT_SEED`, a seed no training config uses. Dataset files
that cannot be read are skipped and listed (relative name + reason); every other bad input
(unknown label, mask of the wrong size, empty split) stops with the dataset's error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..cine import CineReadError
from ..data import build_dataset, dataset_names
from ..data.datasets import dataset_layout
from ..data.files import scrub_paths
from ..data.labels import AR_BINARY, AS_TASKS
from ..data.phantom import HELD_OUT_SEED  # noqa: F401 (public here too)
from ..training.task_data import registry_dataset


@dataclass
class DataSpec:
    """A parsed ``--data`` value: a registry name ``kind`` with its ``root`` (or ``n`` studies for a
    dataset made in memory, whose ``split`` and ``description`` its layout fixes)."""

    kind: str
    n: int = 0
    root: Optional[str] = None
    options: dict = field(default_factory=dict)
    config_data: Optional[dict] = None     # a fine-tuning config's data section (label-efficiency runs)
    split: Optional[str] = None            # the split this spec always reads (phantom:N: the held-out studies)
    description: Optional[dict] = None     # what metrics.json says about it, when the layout fixes that

    def describe(self, split: str) -> dict:
        """What metrics.json says about the data (no paths: they may name patients)."""
        if self.description is not None:
            return dict(self.description)
        if self.config_data is not None:
            return {"kind": "dataset", "dataset": self.config_data["kind"], "split": split, "from": "config"}
        return {"kind": "dataset", "dataset": self.kind, "split": split,
                "options": {k: v for k, v in self.options.items() if k != "csv_file"}}


def config_data_spec(data: dict) -> DataSpec:
    """The data a fine-tuning config's ``data`` section names, read as the fine-tuning loop reads
    it (:func:`training.task_data.registry_dataset`), for evaluating on its test split; or the
    layout's own held-out set (phantoms: ``phantom:<n_test or 16>``)."""
    held_out = dataset_layout(data["kind"]).default_held_out(data)
    if held_out is not None:
        return parse_data_spec(held_out)
    return DataSpec("config", root=data.get("root"), config_data=dict(data))


def parse_data_spec(spec: str, options: Optional[dict] = None) -> DataSpec:
    """``NAME:ROOT`` (or ``phantom:N``) -> :class:`DataSpec`; a clear error for anything else."""
    name, sep, rest = str(spec).partition(":")
    name = name.strip().lower()
    if not sep or not rest:
        raise ValueError(f"--data {spec!r}: expected 'phantom:N' or 'NAME:ROOT' with NAME in {dataset_names()}")
    if name not in dataset_names():
        raise ValueError(f"--data {spec!r}: unknown dataset {name!r}; expected one of {dataset_names()}")
    fields = dataset_layout(name).from_spec(rest, spec)
    return DataSpec(name, **{**fields, "options": {**fields.get("options", {}), **(options or {})}})


# ---------------------------------------------------------------------- datasets
class _Guarded(Dataset):
    """Dataset view whose items are ``("ok", item)`` or ``("skip", relative name, reason)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return ("ok", self.dataset[i])
        except CineReadError as exc:
            rel = self.dataset.relative(exc.path)
            return ("skip", rel, scrub_paths(exc.reason, exc.path, rel, self.dataset.root))


def dataset_classes(ds, task: str) -> Optional[list]:
    """Class names in the order of the dataset's ``label`` indices (None: no class labels)."""
    if task not in ("view", "as", "ar"):
        return None
    if getattr(ds, "name", "") == "ar_multiview":
        return list(AR_BINARY)
    classes = getattr(ds, "classes", None)
    if isinstance(classes, dict):
        classes = next(iter(classes.values())) if len(classes) == 1 else None
    return [str(c) for c in classes] if classes else None


def label_remap(data_names: Optional[list], model_names: list) -> Optional[list]:
    """Dataset class index -> checkpoint class index, matching names (case-insensitive); a clear
    error when the data holds classes the checkpoint does not know."""
    if data_names is None:
        return None
    upper = [str(c).upper() for c in model_names]
    unknown = [c for c in data_names if str(c).upper() not in upper]
    if unknown:
        raise ValueError(f"the data's classes {data_names} include {unknown}, which the checkpoint's classes "
                         f"{list(model_names)} do not")
    return [upper.index(str(c).upper()) for c in data_names]


def dataset_options(spec: DataSpec, task: str, class_names) -> dict:
    """``spec.options`` completed from the checkpoint (:meth:`EchoDataset.eval_options`; phantoms index
    their labels by its classes): TMED-2 AS checkpoints pick the AS task whose class list equals their
    labels unless ``task=`` is given."""
    opts = dataset_layout(spec.kind).eval_options(spec.options, task, class_names)
    if spec.kind == "tmed2" and task == "as" and "task" not in opts:
        match = [name for name, (names, _) in AS_TASKS.items() if list(names) == list(class_names or [])]
        if len(match) != 1:
            raise ValueError(f"cannot tell the TMED-2 AS task from the checkpoint's classes {class_names}; "
                             f"give --data-option task=<one of {sorted(AS_TASKS)}>")
        opts["task"] = match[0]
    return opts


def build_eval_dataset(spec: DataSpec, task: str, split: str, frames: int, size: int, class_names=None):
    """The registry dataset of ``spec`` at the model's frames / size, reading errors surfaced
    to the caller (``skip_unreadable=False``) so that no case is counted twice."""
    if spec.kind == "cache":
        raise ValueError("--data cache:...: the clip cache holds no labels; use the dataset it was cut from")
    if spec.config_data is not None:
        ds = registry_dataset(task, spec.config_data, split, frames, size)
        ds.skip_unreadable = False
        return ds
    return build_dataset(spec.kind, spec.root, split=split, frames=frames, size=size, skip_unreadable=False,
                         **dataset_options(spec, task, class_names))


def batches(spec: DataSpec, task: str, split: str, frames: int, size: int, batch_size: int,
            class_names=None, workers: int = 0) -> tuple[Iterator[list[dict]], list, int]:
    """(iterator over lists of cases, the list of skipped files it fills, number of cases announced)."""
    skipped: list = []
    ds = build_eval_dataset(spec, task, spec.split or split, frames, size, class_names)
    remap = label_remap(dataset_classes(ds, task), class_names or [])
    skipped += [{"file": rel, "reason": why} for rel, why in getattr(ds, "skipped", [])]
    loader = DataLoader(_Guarded(ds), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=list)

    def gen_dataset():
        for chunk in loader:
            ok = []
            for entry in chunk:
                if entry[0] == "ok":
                    item = entry[1]
                    if remap is not None and "label" in item:
                        if int(item["label"]) < 0:          # CSV row without this label
                            continue
                        item["label"] = remap[int(item["label"])]
                    ok.append(item)
                else:
                    skipped.append({"file": entry[1], "reason": entry[2]})
            if ok:
                yield ok
    return gen_dataset(), skipped, len(ds)


def stack(items: list[dict], key: str, device=None) -> torch.Tensor:
    """``items[*][key]`` stacked into one tensor (on ``device``); a clear error when absent."""
    if any(key not in it for it in items):
        raise ValueError(f"the data has no {key!r} target for this task (keys: {sorted(items[0])})")
    values = [it[key] if torch.is_tensor(it[key]) else torch.as_tensor(it[key]) for it in items]
    out = torch.stack(values)
    return out.to(device) if device is not None else out
