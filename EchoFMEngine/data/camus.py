"""CAMUS: ``patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES,half_sequence}[_gt].{nii.gz|mhd}`` + ``Info_*.cfg``.

One item per (patient, view): the ED->ES half sequence (``_sequence`` in the 2019 .mhd
release) made a full cycle by reverse padding, resampled to T frames, with masks
(1 LV endo, 2 myocardium, 3 LA) on the frames that show ED and ES (every frame when
``_half_sequence_gt`` exists and ``sequence_masks`` is on). Splits come from
``database_split/subgroup_{training,validation,testing}.txt`` when present, else from a
stable hash of the patient name.
"""
from __future__ import annotations

import re
from pathlib import Path

from EchoFMEngine.data.clips import cycle_clip
from EchoFMEngine.data.datasets import EchoDataset
from EchoFMEngine.data.files import hash_split, normalise_split
from EchoFMEngine.data.masks import check_mask, read_label_image
from EchoFMEngine.io import load_cine

VIEWS = ("2CH", "4CH")
SUFFIXES = (".nii.gz", ".mhd", ".nii", ".mha")
SPLIT_FILES = {"train": "subgroup_training.txt", "val": "subgroup_validation.txt", "test": "subgroup_testing.txt"}
_PATIENT = re.compile(r"^patient\d+$")


def read_info_cfg(path) -> dict:
    """``Info_*.cfg`` as a dict (``key: value`` lines); only acquisition facts are kept."""
    path = Path(path)
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if ":" not in line:
            raise ValueError(f"{path}: line {n}: expected 'key: value', got {line.strip()!r}")
        key, value = (s.strip() for s in line.split(":", 1))
        out[key] = value
    for key in ("ED", "ES"):
        if key not in out:
            raise ValueError(f"{path}: missing {key}")
        try:
            out[key] = int(float(out[key]))
        except ValueError:
            raise ValueError(f"{path}: {key} {out[key]!r} is not a frame number") from None
    keep = {"ED", "ES", "NbFrame", "ImageQuality", "EF", "LVef", "LVedv", "LVesv", "FrameRate"}
    return {k: v for k, v in out.items() if k in keep}


def _find(folder: Path, stem: str):
    for suf in SUFFIXES:
        p = folder / f"{stem}{suf}"
        if p.exists():
            return p
    return None


def _split_lists(root: Path) -> dict[str, str]:
    """{patient: split} from the official split files, if any."""
    out = {}
    for folder in (root / "database_split", root.parent / "database_split"):
        if folder.is_dir():
            for split, name in SPLIT_FILES.items():
                f = folder / name
                if f.exists():
                    for line in f.read_text().split():
                        out[line.strip()] = split
            break
    return out


class Camus(EchoDataset):
    """CAMUS in its published layout; ``views`` picks 2CH and/or 4CH."""

    name = "camus"

    def __init__(self, root, split: str = "train", views=VIEWS, sequence_masks: bool = True, **options):
        bad = [v for v in views if v not in VIEWS]
        if bad:
            raise ValueError(f"unknown CAMUS view(s) {bad}; expected {list(VIEWS)}")
        self.views, self.sequence_masks = tuple(views), sequence_masks
        super().__init__(root, split=split, **options)

    def _patients_root(self) -> Path:
        for cand in (self.root / "database_nifti", self.root / "training", self.root):
            if cand.is_dir() and any(_PATIENT.match(p.name) for p in cand.iterdir() if p.is_dir()):
                return cand
        raise FileNotFoundError(f"{self.root}: no patientXXXX folders found (CAMUS layout)")

    def index(self) -> None:
        base = self._patients_root()
        want = normalise_split(self.split)
        official = _split_lists(self.root)
        for folder in sorted(p for p in base.iterdir() if p.is_dir() and _PATIENT.match(p.name)):
            patient = folder.name
            split = official.get(patient) if official else hash_split(patient)
            if split is None or (want != "all" and split != want):
                continue
            for view in self.views:
                stem = f"{patient}_{view}"
                files = {k: _find(folder, f"{stem}_{k}") for k in
                         ("half_sequence", "ED_gt", "ES_gt", "half_sequence_gt")}
                if files["half_sequence"] is None:  # 2019 .mhd release: "_sequence" (ED..ES as well)
                    files["half_sequence"] = _find(folder, f"{stem}_sequence")
                cfg = folder / f"Info_{view}.cfg"
                rel = f"{folder.relative_to(self.root).as_posix()}/{stem}"
                missing = [k for k in ("half_sequence", "ED_gt", "ES_gt") if files[k] is None]
                if missing or not cfg.exists():
                    what = [f"{stem}_{k}" for k in missing] + ([] if cfg.exists() else [cfg.name])
                    self.skip(rel, f"missing {', '.join(what)}")
                    continue
                info = read_info_cfg(cfg)
                self.samples.append({"rel": rel, "patient": patient, "view": view, "split": split,
                                     "files": files, "info": info, "cfg": cfg})

    def load(self, sample) -> dict:
        files, info = sample["files"], sample["info"]
        cine = load_cine(files["half_sequence"])
        n, h, w = cine.shape
        ed, es = info["ED"] - 1, info["ES"] - 1  # 1-based in the cfg
        if not (0 <= ed < n and 0 <= es < n) or ed >= es:
            raise ValueError(f"{sample['cfg']}: ED={info['ED']} / ES={info['ES']} do not fit the half "
                             f"sequence of {n} frames")
        half = cine.frames[ed:es + 1]
        masks = {}
        seq_gt = files.get("half_sequence_gt") if self.sequence_masks else None
        if seq_gt is not None:
            stack = read_label_image(seq_gt)
            if stack.ndim != 3 or stack.shape[0] != n:
                raise ValueError(f"{seq_gt}: {stack.shape[0] if stack.ndim == 3 else 1} mask frame(s) for a "
                                 f"half sequence of {n} frames")
            for k in range(ed, es + 1):
                masks[k - ed] = check_mask(stack[k], (h, w), seq_gt)
        else:
            masks[0] = check_mask(read_label_image(files["ED_gt"]), (h, w), files["ED_gt"])
            masks[es - ed] = check_mask(read_label_image(files["ES_gt"]), (h, w), files["ES_gt"])
        clip = cycle_clip(half, self.frames, self.size, masks=masks, reverse_pad_half=True,
                          where=str(files["half_sequence"]))
        item = {"video": clip.video, "masks": clip.masks, "mask_valid": clip.mask_valid,
                "meta": {**clip.meta(), "path": sample["rel"], "view": sample["view"], "split": sample["split"],
                         "ed_frame": ed, "es_frame": es, "image_quality": info.get("ImageQuality", "")}}
        ef = info.get("LVef", info.get("EF"))
        try:
            item["ef"] = float(ef) if ef is not None else float("nan")
        except ValueError:
            raise ValueError(f"{sample['cfg']}: EF {ef!r} is not a number") from None
        return item
