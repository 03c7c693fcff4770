"""TMED-2: PNG stills with a CSV of ``query_key``, ``view_label``, ``diagnosis_label`` and split columns.

Stills are fed as clips by repeating them along time. Tasks: ``view`` (A2C, A4C, PLAX,
PSAX, other) and the AS tasks of :data:`labels.AS_TASKS`. Images are found at
``root/<SourceFolder>/<query_key>`` when the CSV has ``SourceFolder``, else ``root/<query_key>``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from EchoFMEngine.data.clips import still_clip
from EchoFMEngine.data.datasets import EchoDataset
from EchoFMEngine.data.files import normalise_split
from EchoFMEngine.data.labels import AS_GRADES, AS_TASKS, TMED2_VIEW_ALIASES, TMED2_VIEWS, encode_label, is_missing
from EchoFMEngine.io import load_cine

TASKS = ("view",) + tuple(AS_TASKS)
SPLIT_COLUMNS = {"view": ("view_classifier_split", "split"), "as": ("diagnosis_classifier_split", "split")}


def find_label_csv(root: Path) -> Path:
    """The one CSV under ``root`` (depth <= 2) with a ``query_key`` column."""
    found = []
    for pattern in ("*.csv", "*/*.csv", "*/*/*.csv"):
        for p in sorted(root.glob(pattern)):
            with open(p, encoding="utf-8", errors="replace") as fh:
                if "query_key" in fh.readline():
                    found.append(p)
    if not found:
        raise FileNotFoundError(f"{root}: no CSV with a query_key column (TMED-2 layout)")
    if len(found) > 1:
        names = [p.relative_to(root).as_posix() for p in found]
        raise ValueError(f"{root}: several TMED-2 label CSVs {names}; pass csv_file=... to pick one")
    return found[0]


class Tmed2(EchoDataset):
    """TMED-2 labelled stills; ``task`` is 'view' or an AS task (as_presence, as_early_vs_significant, ...)."""

    name = "tmed2"

    def __init__(self, root, split: str = "train", task: str = "view", csv_file=None,
                 views: Optional[Sequence[str]] = None, **options):
        if task not in TASKS:
            raise ValueError(f"unknown TMED-2 task {task!r}; expected one of {list(TASKS)}")
        self.task, self.csv_file, self.view_filter = task, csv_file, views
        self.classes = TMED2_VIEWS if task == "view" else AS_TASKS[task][0]
        super().__init__(root, split=split, **options)

    def index(self) -> None:
        csv_path = Path(self.csv_file) if self.csv_file else find_label_csv(self.root)
        if not csv_path.is_absolute():
            csv_path = self.root / csv_path
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        label_col = "view_label" if self.task == "view" else "diagnosis_label"
        for col in ("query_key", label_col):
            if col not in df.columns:
                raise ValueError(f"{csv_path}: missing column {col!r}")
        split_col = next((c for c in SPLIT_COLUMNS["view" if self.task == "view" else "as"] if c in df.columns),
                         None)
        want = normalise_split(self.split)
        if want != "all" and split_col is None:
            raise ValueError(f"{csv_path}: no split column ({SPLIT_COLUMNS}); use split='all'")
        where = str(csv_path)
        for i, row in df.iterrows():
            line = int(i) + 2
            if want != "all":
                try:
                    if normalise_split(row[split_col]) != want:
                        continue
                except ValueError:
                    continue  # e.g. 'unlabeled' rows
            value = row[label_col]
            if is_missing(value):
                continue
            view = row.get("view_label", "")
            if self.task == "view":
                label = encode_label(value, TMED2_VIEWS, where, line, label_col, TMED2_VIEW_ALIASES)
            else:
                grade = AS_GRADES[encode_label(value, AS_GRADES, where, line, label_col)]
                label = AS_TASKS[self.task][1][grade]
                if label is None:  # not part of this task (e.g. no_AS for early vs significant)
                    continue
            if self.view_filter is not None:
                v = TMED2_VIEWS[encode_label(view, TMED2_VIEWS, where, line, "view_label", TMED2_VIEW_ALIASES)]
                if v not in self.view_filter:
                    continue
            folder = row["SourceFolder"].strip() if "SourceFolder" in df.columns else ""
            rel = (Path(folder) / row["query_key"].strip()).as_posix() if folder else row["query_key"].strip()
            if not (self.root / rel).exists():
                self.skip(rel, f"image listed in {csv_path.name} row {line} is missing")
                continue
            self.samples.append({"rel": rel, "label": label, "view": str(view)})

    def load(self, sample) -> dict:
        cine = load_cine(self.root / sample["rel"])
        clip = still_clip(cine.frames[0], self.frames, self.size)
        return {"video": clip.video, "label": int(sample["label"]),
                "meta": {**clip.meta(), "path": sample["rel"], "view": sample["view"],
                         "task": self.task, "class_name": self.classes[sample["label"]]}}
