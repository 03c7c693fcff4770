"""One registry for every dataset layout, and the base class they share.

``build_dataset(name, root, split=..., **options)`` returns a torch ``Dataset`` whose
items are dicts: ``video`` float [3, T, S, S] in [0, 1], task targets (``label``,
``ef``, ``masks`` [T, S, S] long with ``mask_valid`` [T] bool, ...) and ``meta``
(relative path, source frame indices, full_cycle flag).
"""
from __future__ import annotations

import importlib
import logging
import warnings
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from EchoFMEngine.cine import CineReadError
from EchoFMEngine.data.files import relative_name, scrub_paths
from EchoFMEngine.tasks import TASK_NAMES

log = logging.getLogger(__name__)

# name -> "module:Class" (imported on first use)
DATASETS: dict[str, str] = {
    "echonet": "EchoFMEngine.data.echonet:EchoNetDynamic",
    "camus": "EchoFMEngine.data.camus:Camus",
    "tmed2": "EchoFMEngine.data.tmed2:Tmed2",
    "ar_multiview": "EchoFMEngine.data.ar_multiview:ARMultiView",
    "csv": "EchoFMEngine.data.generic:CsvClips",
    "folder": "EchoFMEngine.data.generic:FolderClips",
    "cache": "EchoFMEngine.data.cache:ClipCache",
    "phantom": "EchoFMEngine.data.phantom:Phantoms",
}
# name -> the tasks it has targets for ('pretrain': unlabelled clips for pretraining)
DATASET_TASKS: dict[str, tuple[str, ...]] = {
    "echonet": ("segment", "ef"),
    "camus": ("segment", "ef"),
    "tmed2": ("view", "as"),
    "ar_multiview": ("ar",),
    "csv": ("view", "as", "ef", "segment"),
    "folder": ("pretrain",),
    "cache": ("pretrain",),
    "phantom": (*TASK_NAMES, "pretrain"),
}


def dataset_names() -> list[str]:
    """Names accepted by :func:`build_dataset`."""
    return sorted(DATASETS)


def dataset_tasks(name: str) -> tuple[str, ...]:
    """The tasks dataset ``name`` can feed (fine-tuning tasks, and 'pretrain')."""
    return DATASET_TASKS[_key(name)]


def dataset_class(name: str) -> type:
    """The class behind dataset ``name`` (its module is imported now)."""
    module, cls = DATASETS[_key(name)].split(":")
    return getattr(importlib.import_module(module), cls)


def dataset_layout(name: str) -> type:
    """The class whose hooks (``task_classes``, ``config_options``, ``from_spec``, ...) describe dataset
    ``name``: its own class, or :class:`EchoDataset`'s defaults for one that is not an EchoDataset (the cache)."""
    klass = dataset_class(name)
    return klass if issubclass(klass, EchoDataset) else EchoDataset


def _key(name: str) -> str:
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {dataset_names()}")
    return key


def build_dataset(name: str, root, split: str = "train", **options) -> Dataset:
    """Build dataset ``name`` (one of :func:`dataset_names`; 'phantom' takes ``root=None``)."""
    klass = dataset_class(name)
    if _key(name) == "cache":  # the cache has no splits: one folder per split if needed
        return klass(root, **options)
    return klass(root, split=split, **options)


class EchoDataset(Dataset):
    """Base: subclasses fill ``self.samples`` in ``index()`` and turn one sample into an item in ``load()``.

    Options shared by all layouts: ``frames`` (T), ``size`` (S), ``transform`` (callable on
    the item dict, e.g. an augmentation), ``window`` ('best': the clip window holding the
    most labelled frames, first of those; 'random': random among those), and
    ``skip_unreadable`` (an unreadable file is reported and the next sample is returned).
    """

    name = "base"
    needs_root = True      # False: the layout makes its samples (phantoms) and takes root=None

    def __init__(self, root, split: str = "train", frames: int = 32, size: int = 224,
                 transform: Optional[Callable[[dict], dict]] = None, window: str = "best",
                 skip_unreadable: bool = True):
        if root is None and self.needs_root:
            raise ValueError(f"the {self.name} dataset needs a root folder")
        self.root = Path(root) if root is not None else None
        if self.root is not None and not self.root.exists():
            raise FileNotFoundError(f"{self.root}: dataset root does not exist")
        if window not in ("best", "random"):
            raise ValueError(f"window must be 'best' or 'random', got {window!r}")
        if frames < 1 or size < 8:
            raise ValueError(f"frames must be >= 1 and size >= 8, got frames={frames}, size={size}")
        self.split = split
        self.frames, self.size = int(frames), int(size)
        self.transform = transform
        self.window = window
        self.skip_unreadable = skip_unreadable
        self.skipped: list[tuple[str, str]] = []  # (relative path, reason) reported at index or load time
        self.samples: list = []
        self.index()
        if not self.samples:
            raise ValueError(f"{self.root}: no samples for split {split!r} in the {self.name} dataset"
                             + (f" ({len(self.skipped)} skipped, first: {self.skipped[0]})" if self.skipped else ""))

    # -- subclass hooks -------------------------------------------------------------------
    def index(self) -> None:
        raise NotImplementedError

    def load(self, sample) -> dict:
        raise NotImplementedError

    # -- what fine-tuning and evaluation ask of a layout (defaults: a folder of files with named splits) --
    @classmethod
    def task_classes(cls, task: str) -> Optional[list]:
        """The layout's own class names for ``task`` (None: the task's or the config's)."""
        return None

    @classmethod
    def task_notes(cls, task: str) -> list:
        """Notes a model trained on this layout for ``task`` carries (e.g. where its labels come from)."""
        return []

    @classmethod
    def config_splits(cls, data: dict) -> tuple:
        """(train, val, test) split names a fine-tuning config's ``data`` section reads (val/test may be None)."""
        return data["train_split"], data["val_split"], data["test_split"]

    @classmethod
    def config_options(cls, task: str, data: dict, split: str) -> dict:
        """Options of this layout that a config's ``data`` section sets for ``task`` and ``split``."""
        return {}

    @classmethod
    def from_spec(cls, arg: str, spec: str) -> dict:
        """What ``--data NAME:ARG`` means for this layout, as DataSpec fields (here: ARG is the root)."""
        return {"root": arg}

    @classmethod
    def eval_options(cls, options: dict, task: str, class_names) -> dict:
        """``options`` completed for evaluating a checkpoint of ``task`` with ``class_names``."""
        return dict(options)

    @classmethod
    def default_held_out(cls, data: dict) -> Optional[str]:
        """The ``--data`` spec a config's models are evaluated on by default (None: its test split)."""
        return None

    # -- shared ---------------------------------------------------------------------------
    def skip(self, rel: str, reason: str) -> None:
        """Record and report a sample left out."""
        self.skipped.append((rel, reason))
        log.warning("%s: skipped %s: %s", self.name, rel, reason)

    def relative(self, path) -> str:
        """``path`` relative to the dataset root (as written to logs and ``meta``)."""
        try:
            return relative_name(path, self.root if self.root.is_dir() else self.root.parent)
        except ValueError:  # another drive on Windows
            return Path(path).name

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        n = len(self.samples)
        for attempt in range(min(n, 20)):
            j = (i + attempt) % n
            try:
                item = self.load(self.samples[j])
                break
            except CineReadError as exc:
                if not self.skip_unreadable:
                    raise
                rel = self.relative(exc.path)
                reason = scrub_paths(exc.reason, exc.path, rel, self.root)
                self.skipped.append((rel, reason))
                warnings.warn(f"{self.name}: unreadable file skipped: {rel}: {reason}", RuntimeWarning,
                              stacklevel=2)
        else:
            raise RuntimeError(f"{self.root}: {min(n, 20)} consecutive samples from {i} were unreadable")
        return self.transform(item) if self.transform is not None else item
