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
}


def dataset_names() -> list[str]:
    """Names accepted by :func:`build_dataset`."""
    return sorted(DATASETS)


def build_dataset(name: str, root, split: str = "train", **options) -> Dataset:
    """Build dataset ``name`` ('echonet', 'camus', 'tmed2', 'ar_multiview', 'csv', 'folder', 'cache')."""
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {dataset_names()}")
    module, cls = DATASETS[key].split(":")
    klass = getattr(importlib.import_module(module), cls)
    if key == "cache":  # the cache has no splits: one folder per split if needed
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

    def __init__(self, root, split: str = "train", frames: int = 32, size: int = 224,
                 transform: Optional[Callable[[dict], dict]] = None, window: str = "best",
                 skip_unreadable: bool = True):
        self.root = Path(root)
        if not self.root.exists():
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
