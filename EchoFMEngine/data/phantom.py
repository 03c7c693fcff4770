"""The phantoms as a registered dataset: synthetic studies with known truth (:mod:`EchoFMEngine.clinical.phantoms`)
prepared at the model size, with seeded splits, the tasks they serve and the proxy labels the AS / AR tasks use.

    build_dataset("phantom", None, split="train", task="view", n=24, seed=0, frames=16, size=64)

Phantoms have views A4C / A2C, ED/ES masks and a known EF, and nothing else: the AS and AR tasks on phantoms
use *synthetic proxy labels derived from the phantom's EF* (:data:`PROXY_NOTES`), named ``proxy_*`` so that no
one mistakes them for a clinical grading. Every phantom is made here; the generator itself stays in
``clinical.phantoms``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..clinical.geometry import prepare_frames
from ..clinical.phantoms import make_study
from .datasets import EchoDataset
from .labels import AR_SEVERE_FROM, AR_VIEWS

VIEWS = ["A2C", "A4C"]             # class order of the view task on phantoms
PROXY_LABELS = {"as": ["proxy_ef_ge_50", "proxy_ef_lt_50"], "ar": ["proxy_non_severe", "proxy_severe"]}
PROXY_NOTES = {
    "as": "synthetic proxy label, no clinical meaning: phantoms have no aortic valve; class 1 = phantom EF < 50 %",
    "ar": "synthetic proxy label, no clinical meaning: phantoms have no colour Doppler; severity = (70 - EF) / 10 "
          "rounded to 0.5 and clipped to 0-4, severe >= 2.5; the four view slots hold A4C/A2C phantoms of the "
          "same heart, each present with probability 0.75",
}
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}    # studies of a split: seed (10*data.seed + k)*1000 + i
HELD_OUT_SEED = 90210   # split 'held_out' (evaluate --data phantom:N): studies 90210 * 1000 + i, far from the above
CLIP_TASKS = ("view", "as", "ef", "segment")


def split_seed(split: str, seed: int = 0) -> int:
    """The first-study seed of ``split``: ``10 * seed + k`` for train / val / test, :data:`HELD_OUT_SEED`
    for 'held_out' (which ``seed`` does not change)."""
    if split == "held_out":
        return HELD_OUT_SEED
    if split not in SPLIT_SEEDS:
        raise ValueError(f"phantom split {split!r}: expected one of {[*SPLIT_SEEDS, 'held_out']}")
    return 10 * int(seed) + SPLIT_SEEDS[split]


# ------------------------------------------------------------------ clips and items
def phantom_clip(view: str, frames: int, size: int, heart_rate_bpm: float, cycles: float, ef: float,
                 seed: int) -> tuple:
    """One phantom study filmed so that ``frames`` frames span ``cycles`` heartbeats, prepared to
    the model size: (video float ``[3, T, S, S]`` in [0, 1], the study with its truth, the sector transform)."""
    fps = frames * heart_rate_bpm / 60.0 / cycles
    study = make_study(view=view, n_frames=frames, size=(size * 2, size * 2), fps=fps,
                       heart_rate_bpm=heart_rate_bpm, ef=ef, seed=seed)
    clip, transform = prepare_frames(study.cine.frames, size)
    video = torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2).float() / 255.0
    return video, study, transform


def pretrain_clips(n: int, frames: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` unlabelled clips for pretraining (studies ``seed * 1000 + i``): views, heart rates and EFs
    vary, each clip spans 1.1-1.6 cardiac cycles."""
    if n < 1:
        raise ValueError("data.n_studies must be >= 1")
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        hr = float(rng.uniform(55, 95))
        cycles = float(rng.uniform(1.1, 1.6))
        video, _, _ = phantom_clip(("A4C", "A2C")[i % 2], frames, size, hr, cycles,
                                   ef=float(rng.uniform(30, 70)), seed=seed * 1000 + i)
        clips.append(video)
    return clips


def segmentation_items(n: int, img_size: int, num_frames: int, seed: int = 0,
                       cycles: tuple[float, float] = (1.1, 1.4)) -> list[dict]:
    """``n`` phantom clips at the model size, each covering at least one full cardiac cycle.

    Item: ``video`` float ``[3,T,S,S]`` in [0,1], ``masks`` long ``[T,S,S]`` (labels 0-3, via
    ``transform.to_model``), ``mask_valid`` bool ``[T]`` (True at the ED and ES frames only),
    ``spacing_mm`` of a model pixel, and the study's view / EF / seed.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E6]))
    items = []
    for i in range(n):
        hr = float(rng.uniform(55, 95))
        video, study, tf = phantom_clip(("A4C", "A2C")[i % 2], num_frames, img_size, hr, float(rng.uniform(*cycles)),
                                        ef=float(rng.uniform(30, 70)), seed=seed * 1000 + i)
        valid = np.zeros(num_frames, dtype=bool)
        valid[np.concatenate([study.ed_frames, study.es_frames]).astype(int)] = True
        items.append({
            "video": video,
            "masks": torch.from_numpy(tf.to_model(study.masks)).long(),
            "mask_valid": torch.from_numpy(valid),
            "spacing_mm": tuple(float(s) / tf.scale for s in study.cine.spacing_mm),
            "view": study.view, "ef": study.ef, "seed": study.seed,
        })
    return items


def ar_proxy_severity(ef: float) -> float:
    """The AR phantom proxy: (70 - EF) / 10 in 0.5 steps, clipped to 0-4 (see PROXY_NOTES)."""
    return float(np.clip(np.round(2 * (70.0 - ef) / 10.0) / 2, 0.0, 4.0))


def _ar_items(n: int, size: int, frames: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA12]))
    items = []
    for i in range(n):
        hr, cycles, ef = float(rng.uniform(55, 95)), float(rng.uniform(1.1, 1.4)), float(rng.uniform(30, 70))
        present = rng.random(len(AR_VIEWS)) < 0.75
        if not present.any():
            present[rng.integers(len(AR_VIEWS))] = True
        videos, efs = [], []
        for v in range(len(AR_VIEWS)):
            if not present[v]:
                videos.append(torch.zeros(3, frames, size, size))
                continue
            video, study, _ = phantom_clip(VIEWS[(v + 1) % 2], frames, size, hr, cycles, ef=ef,
                                           seed=(seed * 1000 + i) * 10 + v)
            videos.append(video)
            efs.append(study.ef)
        sev = ar_proxy_severity(float(np.mean(efs)))
        items.append({"video": torch.stack(videos), "view_valid": torch.from_numpy(present),
                      "severity": sev, "label": int(sev >= AR_SEVERE_FROM), "ef": float(np.mean(efs)),
                      "seed": seed * 1000 + i})
    return items


def task_items(task: str, n: int, size: int, frames: int, seed: int = 0) -> list[dict]:
    """``n`` phantom items for ``task`` at the model size (studies ``seed * 1000 + i``).

    Single-clip items are the segmentation phantoms (:func:`segmentation_items`) with ``label`` = index
    in :data:`VIEWS` (view) or the AS proxy (EF < 50 %); AR items hold four view slots (``view_valid``),
    ``severity`` and ``label`` from the AR proxy. See :data:`PROXY_NOTES`."""
    if n < 1:
        raise ValueError(f"need at least one phantom study, got n={n}")
    if task == "ar":
        return _ar_items(n, size, frames, seed)
    if task not in CLIP_TASKS:
        raise ValueError(f"no phantom data for task {task!r}")
    items = segmentation_items(n, size, frames, seed=seed)
    for it in items:
        if task == "view":
            it["label"] = VIEWS.index(it["view"])
        elif task == "as":
            it["label"] = int(it["ef"] < 50.0)
    return items


# ------------------------------------------------------------------ the registered dataset
class Phantoms(EchoDataset):
    """``n`` phantom studies of one split for one task, made in memory (no root: pass ``None``).

    ``split``: train / val / test (first study ``10 * seed + k``, :data:`SPLIT_SEEDS`) or 'held_out'
    (:data:`HELD_OUT_SEED`). ``task``: a fine-tuning task (items of :func:`task_items`) or 'pretrain'
    (unlabelled clips of :func:`pretrain_clips`, one pool seeded by ``seed`` itself: pretraining has no
    splits). ``classes``: the class names ``label`` should index (a checkpoint's, matched by name);
    default :data:`VIEWS` / :data:`PROXY_LABELS`."""

    name = "phantom"
    needs_root = False

    def __init__(self, root=None, split: str = "train", task: str = "segment", n: int = 16, seed: int = 0,
                 classes: Optional[Sequence[str]] = None, **options):
        self.task, self.n, self.seed = task, int(n), int(seed)
        self.classes = self._classes(task, classes)
        super().__init__(root, split=split, **options)

    @staticmethod
    def _classes(task: str, names: Optional[Sequence[str]]) -> Optional[list]:
        default = Phantoms.task_classes(task)
        if names is None or default is None:
            return default
        names = [str(c) for c in names]
        if task in PROXY_LABELS and names != PROXY_LABELS[task]:
            raise ValueError(f"phantom {task.upper()} cases carry synthetic proxy labels {PROXY_LABELS[task]}; "
                             f"this checkpoint's classes are {names}: evaluate it on its own dataset instead")
        return names

    def index(self) -> None:
        if self.task == "pretrain":
            self.samples = [{"video": v} for v in pretrain_clips(self.n, self.frames, self.size, self.seed)]
            return
        self.samples = task_items(self.task, self.n, self.size, self.frames, seed=split_seed(self.split, self.seed))
        if self.task == "view" and self.classes != VIEWS:
            upper = [c.upper() for c in self.classes]
            missing = sorted({it["view"] for it in self.samples} - set(upper))
            if missing:
                raise ValueError(f"phantom views {missing} are not among the checkpoint's classes {self.classes}")
            for it in self.samples:
                it["label"] = upper.index(it["view"])

    def load(self, sample) -> dict:
        return dict(sample)      # a copy: callers may re-index a label in place

    @property
    def items(self) -> list[dict]:
        """The finished items, held in memory (targets are read from them without a copy)."""
        return self.samples

    # -- what the registry asks of a layout (see EchoDataset) --------------------------------------
    @classmethod
    def task_classes(cls, task: str) -> Optional[list]:
        if task == "view":
            return list(VIEWS)
        return list(PROXY_LABELS[task]) if task in PROXY_LABELS else None

    @classmethod
    def task_notes(cls, task: str) -> list:
        return [PROXY_NOTES[task]] if task in PROXY_NOTES else []

    @classmethod
    def config_splits(cls, data: dict) -> tuple:
        for key in ("n_train", "n_val"):
            if int(data[key]) < 1:
                raise ValueError(f"data.{key} must be >= 1 for phantom data, got {data[key]}")
        return "train", "val", ("test" if int(data["n_test"]) > 0 else None)

    @classmethod
    def config_options(cls, task: str, data: dict, split: str) -> dict:
        n = data["n_studies"] if task == "pretrain" else data[f"n_{split}"]
        return {"task": task, "n": int(n), "seed": int(data["seed"])}

    @classmethod
    def from_spec(cls, arg: str, spec: str) -> dict:
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"--data {spec!r}: N must be a positive integer")
        n = int(arg)
        return {"n": n, "split": "held_out", "options": {"n": n},
                "description": {"kind": cls.name, "n_studies": n, "seed": HELD_OUT_SEED}}

    @classmethod
    def eval_options(cls, options: dict, task: str, class_names) -> dict:
        return {**options, "task": task, "classes": [str(c) for c in (class_names or [])]}

    @classmethod
    def default_held_out(cls, data: dict) -> Optional[str]:
        return f"{cls.name}:{int(data['n_test']) or 16}"
