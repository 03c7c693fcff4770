"""EchoNet-Dynamic: ``FileList.csv`` + ``Videos/*.avi`` + ``VolumeTracings.csv``.

Targets: ``ef`` (and ``edv``/``esv`` in ml when listed), LV cavity masks (label 1) at the
traced ED and ES frames when they fall inside the clip (``mask_valid`` marks them).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from EchoFMEngine.data.clips import cine_clip
from EchoFMEngine.data.datasets import EchoDataset
from EchoFMEngine.data.files import normalise_split
from EchoFMEngine.data.labels import is_missing, parse_float
from EchoFMEngine.data.tracings import ed_es_frames, rasterise_tracing, read_volume_tracings, video_key
from EchoFMEngine.io import load_cine

FILELIST_COLUMNS = ("FileName", "EF", "Split")


class EchoNetDynamic(EchoDataset):
    """EchoNet-Dynamic in its published layout (``split``: train / val / test / all)."""

    name = "echonet"

    def index(self) -> None:
        filelist = self.root / "FileList.csv"
        if not filelist.exists():
            raise FileNotFoundError(f"{filelist}: missing (EchoNet-Dynamic layout: FileList.csv, Videos/, "
                                    f"VolumeTracings.csv)")
        df = pd.read_csv(filelist, dtype=str, keep_default_na=False)
        missing = [c for c in FILELIST_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{filelist}: missing column(s) {missing}")
        tracings_path = self.root / "VolumeTracings.csv"
        self.tracings = read_volume_tracings(tracings_path) if tracings_path.exists() else {}
        want = normalise_split(self.split)
        for i, row in df.iterrows():
            line = int(i) + 2
            try:
                split = normalise_split(row["Split"])
            except ValueError:
                split = str(row["Split"]).strip().lower()
            if want != "all" and split != want:
                continue
            key = video_key(row["FileName"])
            rel = f"Videos/{key}.avi"
            if not (self.root / rel).exists():
                self.skip(rel, "video listed in FileList.csv is missing")
                continue
            sample = {"key": key, "rel": rel, "split": split,
                      "ef": parse_float(row["EF"], str(filelist), line, "EF")}
            for col in ("EDV", "ESV"):
                if col in df.columns and not is_missing(row[col]):
                    sample[col.lower()] = parse_float(row[col], str(filelist), line, col)
            self.samples.append(sample)

    def load(self, sample) -> dict:
        cine = load_cine(self.root / sample["rel"])
        h, w = cine.shape[1:]
        traced = self.tracings.get(sample["key"], {})
        masks, phase = {}, {}
        if len(traced) >= 2:
            ed, es = ed_es_frames(traced)
            for frame, name in ((ed, "ed"), (es, "es")):
                if 0 <= frame < cine.num_frames:
                    masks[frame] = rasterise_tracing(traced[frame], (h, w)).astype(np.uint8)
                    phase[name] = frame
        clip = cine_clip(cine, self.frames, self.size, masks=masks, window=self.window,
                         where=str(self.root / sample["rel"]))
        item = {"video": clip.video, "ef": float(sample["ef"]), "masks": clip.masks,
                "mask_valid": clip.mask_valid,
                "meta": {**clip.meta(), "path": sample["rel"], "split": sample["split"],
                         "ed_frame": phase.get("ed", -1), "es_frame": phase.get("es", -1)}}
        for key in ("edv", "esv"):
            if key in sample:
                item[key] = float(sample[key])
        return item
