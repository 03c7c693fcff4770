"""Finding cine files in a tree, relative names, and a stable split of unlabelled files."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

from EchoFMEngine.io import supported_suffixes
from EchoFMEngine.io.dicom import is_dicom_file

# Still images: readable, but they hold no cardiac cycle (DICOM files often have no suffix at all).
STILL_SUFFIXES = (".png", ".jpg", ".jpeg")
# Label files that sit beside images in public layouts (CAMUS "_gt"): never cines.
LABEL_STEMS = ("_gt", "_seg", "_mask", "_masks", "_label", "_labels", "-label")
LABEL_NAMES = {"gt", "seg", "segmentation", "mask", "masks", "label", "labels"}
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test", "all": "all"}


def full_suffix(path) -> str:
    """'.nii.gz' for a NIfTI archive, else the last suffix, lower case."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def strip_suffix(path) -> str:
    """File name without its (possibly double) suffix."""
    name = Path(path).name
    suf = full_suffix(path)
    return name[: len(name) - len(suf)] if suf else name


def is_dicom(path) -> bool:
    """True if the file has the DICOM preamble magic ('DICM' at byte 128)."""
    return is_dicom_file(path)


def is_label_file(path) -> bool:
    """True for mask files beside images (e.g. CAMUS ``*_gt.nii.gz``)."""
    stem = strip_suffix(path).lower()
    return stem in LABEL_NAMES or any(stem.endswith(s) for s in LABEL_STEMS)


def cine_suffixes(include_stills: bool = False) -> tuple[str, ...]:
    """File endings the readers understand (stills only when asked: they hold no cycle)."""
    stills = set(STILL_SUFFIXES) | {".bmp"}
    return tuple(s for s in supported_suffixes() if include_stills or s not in stills)


def find_cines(root, suffixes: Optional[Iterable[str]] = None, include_stills: bool = False) -> list[Path]:
    """All readable cine files under ``root`` (sorted), plus suffix-less DICOM files; masks excluded."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    wanted = tuple(s.lower() for s in (suffixes if suffixes is not None else cine_suffixes(include_stills)))
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if "cache.json" in filenames:  # a prepared clip cache, not source data
            dirnames[:] = []
            continue
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            low = name.lower()
            if low.endswith(wanted) or ("." not in name or low.rsplit(".", 1)[1].isdigit()) and is_dicom(p):
                if not is_label_file(p):
                    found.append(p)
    return sorted(found)


def relative_name(path, root) -> str:
    """Path relative to ``root`` with forward slashes (no absolute paths in caches or logs)."""
    return Path(os.path.relpath(Path(path), Path(root))).as_posix()


def normalise_split(split: Optional[str]) -> str:
    """'train' / 'val' / 'test' / 'all' from the usual spellings (TRAIN, validation, ...)."""
    if split is None:
        return "all"
    s = str(split).strip().lower()
    s = SPLIT_ALIASES.get(s, s)
    if s not in SPLITS + ("all",):
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS) + ['all']}")
    return s


def hash_split(name: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Stable train/val/test assignment from a name's hash (same answer on every machine)."""
    h = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    if h < fractions[0]:
        return "train"
    return "val" if h < fractions[0] + fractions[1] else "test"


def scrub_paths(text: str, path, rel: str, root=None) -> str:
    """``text`` with the absolute ``path`` (and ``root``) replaced by relative names, for logs and CSVs."""
    out = str(text).replace(str(path), rel)
    try:
        out = out.replace(str(Path(path).resolve()), rel)
    except OSError:
        pass
    if root is not None:
        out = out.replace(str(root), ".")
    return out
