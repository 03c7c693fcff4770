"""Multi-view colour Doppler aortic regurgitation: one item = all views of one study.

CSV columns ``study_id, view, path, severity`` (+ optional ``split``); views A3C, A5C,
PSAX, PLAX; severity 0.0-4.0 in 0.5 steps, severe if >= 2.5. Paths are relative to the
CSV's folder. Item ``video`` is [V, 3, T, S, S] in :data:`labels.AR_VIEWS` order with
``view_valid`` [V] (absent views are zeros), ``severity`` float, ``severity_class``
(index of the 0.5 step) and ``label`` (0 non-severe, 1 severe).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from EchoFMEngine.data.clips import cine_clip
from EchoFMEngine.data.datasets import EchoDataset
from EchoFMEngine.data.files import normalise_split
from EchoFMEngine.data.labels import AR_SEVERE_FROM, AR_SEVERITY_STEPS, AR_VIEWS, encode_label, parse_float
from EchoFMEngine.io import load_cine

COLUMNS = ("study_id", "view", "path", "severity")


def resolve_csv(root: Path, csv_file=None) -> Path:
    """``csv_file`` (relative to root), ``root`` itself when it is a CSV, or the one CSV in ``root``."""
    if csv_file is not None:
        p = Path(csv_file)
        return p if p.is_absolute() else root / p
    if root.is_file():
        return root
    found = sorted(root.glob("*.csv"))
    if len(found) != 1:
        raise ValueError(f"{root}: expected exactly one CSV, found {[p.name for p in found]}; pass csv_file=...")
    return found[0]


class ARMultiView(EchoDataset):
    """AR severity from several colour Doppler views per study."""

    name = "ar_multiview"

    def __init__(self, root, split: str = "train", csv_file=None, **options):
        self.csv_file = csv_file
        super().__init__(root, split=split, **options)

    def index(self) -> None:
        csv_path = resolve_csv(self.root, self.csv_file)
        base = csv_path.parent
        self.base = base
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; expected {list(COLUMNS)}")
        want = normalise_split(self.split)
        if want != "all" and "split" not in df.columns:
            raise ValueError(f"{csv_path}: no 'split' column; use split='all'")
        where = str(csv_path)
        studies: dict[str, dict] = {}
        for i, row in df.iterrows():
            line = int(i) + 2
            view = AR_VIEWS[encode_label(row["view"], AR_VIEWS, where, line, "view")]
            sev = parse_float(row["severity"], where, line, "severity")
            if sev not in AR_SEVERITY_STEPS:
                raise ValueError(f"{where}: row {line}: severity {row['severity']!r} is not in 0.0-4.0 "
                                 f"in 0.5 steps")
            if want != "all":
                try:
                    if normalise_split(row["split"]) != want:
                        continue
                except ValueError:
                    raise ValueError(f"{where}: row {line}: unknown split {row['split']!r}") from None
            sid = row["study_id"].strip()
            st = studies.setdefault(sid, {"study_id": sid, "severity": sev, "views": {}, "line": line})
            if st["severity"] != sev:
                raise ValueError(f"{where}: row {line}: study {sid!r} has severity {sev} here but "
                                 f"{st['severity']} in row {st['line']}")
            rel = row["path"].strip()
            if not (base / rel).exists():
                self.skip(rel, f"clip listed in {csv_path.name} row {line} is missing")
                continue
            st["views"].setdefault(view, rel)  # first clip listed per view
        self.samples = [s for s in studies.values() if s["views"]]

    def load(self, sample) -> dict:
        videos, valid, paths, full = [], [], [], []
        for view in AR_VIEWS:
            rel = sample["views"].get(view)
            if rel is None:
                videos.append(torch.zeros(3, self.frames, self.size, self.size))
                valid.append(False)
                paths.append("")
                full.append(False)
                continue
            clip = cine_clip(load_cine(self.base / rel), self.frames, self.size, window=self.window,
                             where=str(self.base / rel))
            videos.append(clip.video)
            valid.append(True)
            paths.append(rel)
            full.append(clip.full_cycle)
        sev = float(sample["severity"])
        return {"video": torch.stack(videos), "view_valid": torch.tensor(valid),
                "severity": sev, "severity_class": AR_SEVERITY_STEPS.index(sev),
                "label": int(sev >= AR_SEVERE_FROM),
                "meta": {"study_id": sample["study_id"], "paths": paths, "full_cycle": full}}
