"""A user's own data: a labelled CSV of clips (``csv``) or an unlabelled tree of cines (``folder``).

CSV layout (paths relative to the CSV's folder)::

    path,split,view,ef,mask_path,mask_frames
    study1/a4c.dcm,train,A4C,55.0,study1/a4c_masks.nii.gz,0;17

Classification columns and their class lists are given explicitly (``classes={"view":
["A2C", "A4C", ...]}``); numeric targets by ``regression=["ef"]``. Empty cells are
missing labels (class -1, regression NaN). A mask file holds one label map per entry
of ``mask_frames`` (source frame indices), or one map when the clip is a still. An optional ``mask_sources``
column (as the Slicer export writes it) names whose mask each of them is, ``corrected`` / ``propagated`` /
``model`` (``;``-separated, one per ``mask_frames`` entry); items then carry ``mask_propagated`` [T]
(True at the clip frames whose mask was propagated), which fine-tuning can weight or exclude.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from EchoFMEngine.data.ar_multiview import resolve_csv
from EchoFMEngine.data.clips import cine_clip, still_clip
from EchoFMEngine.data.datasets import EchoDataset
from EchoFMEngine.data.files import find_cines, hash_split, normalise_split, relative_name
from EchoFMEngine.data.labels import encode_label, is_missing, parse_float
from EchoFMEngine.data.masks import check_mask, read_label_image
from EchoFMEngine.io import load_cine

MASK_SOURCES = ("corrected", "propagated", "model")     # EchoFMSlicerLib.export.FRAME_SOURCES


def parse_sources(text: str, n_frames: int, where: str, line: int) -> list[str]:
    """'corrected;propagated' -> one known source per mask frame (ValueError naming row and value)."""
    out = [p.strip().lower() for p in str(text).split(";") if p.strip()]
    bad = sorted(set(out) - set(MASK_SOURCES))
    if bad:
        raise ValueError(f"{where}: row {line}: unknown mask source(s) {bad} in mask_sources; "
                         f"expected {list(MASK_SOURCES)}")
    if len(out) != n_frames:
        raise ValueError(f"{where}: row {line}: mask_sources lists {len(out)} source(s) for {n_frames} "
                         f"mask frame(s); give one per mask_frames entry")
    return out


def parse_frames(text: str, where: str, line: int) -> list[int]:
    """'0;17' / '0 17' / '0,17' -> [0, 17]."""
    parts = [p for p in str(text).replace(",", " ").replace(";", " ").split() if p]
    try:
        out = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{where}: row {line}: mask_frames {text!r} is not a list of frame numbers") from None
    if any(f < 0 for f in out):
        raise ValueError(f"{where}: row {line}: negative frame in mask_frames {text!r}")
    return out


class CsvClips(EchoDataset):
    """Clips listed in a CSV with explicit classification / regression targets and optional masks."""

    name = "csv"

    def __init__(self, root, split: str = "train", csv_file=None, classes: Optional[dict] = None,
                 regression: Sequence[str] = (), path_column: str = "path", split_column: str = "split",
                 mask_column: str = "mask_path", mask_frames_column: str = "mask_frames",
                 mask_sources_column: str = "mask_sources", **options):
        self.csv_file, self.classes = csv_file, dict(classes or {})
        self.regression = list(regression)
        self.path_column, self.split_column = path_column, split_column
        self.mask_column, self.mask_frames_column = mask_column, mask_frames_column
        self.mask_sources_column = mask_sources_column
        reserved = {"video", "meta", "masks", "mask_valid", "label"}
        clash = reserved & (set(self.classes) | set(self.regression))
        if clash:
            raise ValueError(f"target column name(s) {sorted(clash)} clash with item keys; rename the column(s)")
        for col, names in self.classes.items():
            if not names or len(set(map(str, names))) != len(names):
                raise ValueError(f"classes[{col!r}] must be a non-empty list of distinct names, got {names!r}")
        super().__init__(root, split=split, **options)

    def index(self) -> None:
        csv_path = resolve_csv(self.root, self.csv_file)
        self.base, where = csv_path.parent, str(csv_path)
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        need = [self.path_column, *self.classes, *self.regression]
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}")
        want = normalise_split(self.split)
        if want != "all" and self.split_column not in df.columns:
            raise ValueError(f"{csv_path}: no {self.split_column!r} column; use split='all'")
        has_masks = self.mask_column in df.columns
        for i, row in df.iterrows():
            line = int(i) + 2
            if want != "all":
                try:
                    split = normalise_split(row[self.split_column])
                except ValueError:
                    raise ValueError(f"{where}: row {line}: unknown split {row[self.split_column]!r}") from None
                if split != want:
                    continue
            targets = {}
            for col, names in self.classes.items():
                v = row[col]
                targets[col] = -1 if is_missing(v) else encode_label(v, [str(n) for n in names], where, line, col)
            for col in self.regression:
                v = row[col]
                targets[col] = math.nan if is_missing(v) else parse_float(v, where, line, col)
            rel = row[self.path_column].strip()
            if not rel:
                raise ValueError(f"{where}: row {line}: empty {self.path_column!r}")
            if not (self.base / rel).exists():
                self.skip(rel, f"clip listed in {csv_path.name} row {line} is missing")
                continue
            sample = {"rel": rel, "targets": targets, "mask": None, "mask_frames": [], "mask_sources": []}
            if has_masks and not is_missing(row[self.mask_column]):
                sample["mask"] = row[self.mask_column].strip()
                if not (self.base / sample["mask"]).exists():
                    raise FileNotFoundError(f"{where}: row {line}: mask file {sample['mask']!r} not found")
                frames_text = row.get(self.mask_frames_column, "")
                sample["mask_frames"] = parse_frames(frames_text, where, line) if not is_missing(frames_text) else []
                sources_text = row.get(self.mask_sources_column, "")
                if not is_missing(sources_text):
                    sample["mask_sources"] = parse_sources(sources_text, max(1, len(sample["mask_frames"])), where,
                                                           line)
            self.samples.append(sample)

    def _masks(self, sample, n_frames: int, shape) -> dict[int, np.ndarray]:
        path = self.base / sample["mask"]
        stack = read_label_image(path)
        if stack.ndim == 2:
            stack = stack[None]
        frames = sample["mask_frames"] or ([0] if n_frames == 1 else [])
        if len(frames) != len(stack):
            raise ValueError(f"{path}: {len(stack)} mask frame(s) but mask_frames lists {len(frames)} "
                             f"({frames}); list one source frame index per mask")
        out = {}
        for f, m in zip(frames, stack):
            if f >= n_frames:
                raise ValueError(f"{path}: mask for frame {f} but the clip has {n_frames} frames")
            out[f] = check_mask(m, shape, path)
        return out

    def load(self, sample) -> dict:
        path = self.base / sample["rel"]
        cine = load_cine(path)
        masks = self._masks(sample, cine.num_frames, cine.shape[1:]) if sample["mask"] else {}
        if cine.num_frames == 1:
            clip = still_clip(cine.frames[0], self.frames, self.size, mask=masks.get(0))
        else:
            clip = cine_clip(cine, self.frames, self.size, masks=masks, window=self.window, where=str(path))
        item = {"video": clip.video, "masks": clip.masks, "mask_valid": clip.mask_valid,
                "meta": {**clip.meta(), "path": sample["rel"]}}
        if "propagated" in sample["mask_sources"]:
            frames = sample["mask_frames"] or [0]
            propagated = {f for f, src in zip(frames, sample["mask_sources"]) if src == "propagated"}
            item["mask_propagated"] = clip.mask_valid & torch.tensor([int(f) in propagated for f in clip.indices])
        item.update(sample["targets"])
        if len(self.classes) == 1:
            item["label"] = sample["targets"][next(iter(self.classes))]
        return item


class FolderClips(EchoDataset):
    """Every readable cine under ``root`` (unlabelled, for pretraining); ``split`` by a stable hash."""

    name = "folder"

    def __init__(self, root, split: str = "all", window: str = "random", suffixes=None, **options):
        self.suffixes = suffixes
        super().__init__(root, split=split, window=window, **options)

    def index(self) -> None:
        want = normalise_split(self.split)
        for p in find_cines(self.root, self.suffixes):
            rel = relative_name(p, self.root)
            if want == "all" or hash_split(rel) == want:
                self.samples.append(rel)

    def load(self, rel) -> dict:
        cine = load_cine(self.root / rel)
        if cine.num_frames == 1:
            clip = still_clip(cine.frames[0], self.frames, self.size)
        else:
            clip = cine_clip(cine, self.frames, self.size, window=self.window, where=str(self.root / rel))
        return {"video": clip.video, "meta": {**clip.meta(), "path": rel}}
