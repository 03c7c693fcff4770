"""The downstream tasks, each declared once, and the one label vocabulary of cardiac structures.

Everything that differs between view identification, segmentation, AS, AR and EF lives in one
:class:`Task` here: its head, outputs, targets, loss, metrics, model-selection metric, label
vocabulary, input preprocessing and what the analysis of a cine reads from it. Fine-tuning,
evaluation, checkpoints, the models folder, analysis and the Slicer library look a task up with
:func:`get_task` (or loop over :data:`TASKS`); a sixth task is one more entry in :data:`TASKS`.

Standard library only, so the Slicer library and the models folder can import it without torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

CLASSIFICATION, SEGMENTATION, REGRESSION = "classification", "segmentation", "regression"
KINDS = (CLASSIFICATION, SEGMENTATION, REGRESSION)


# ------------------------------------------------------------------ structure label vocabulary
@dataclass(frozen=True)
class Label:
    """One value of a segmentation label map: its canonical name (what checkpoints write), a title
    for people, and older names that files may still carry."""

    value: int
    name: str
    title: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Structure:
    """A region scored and drawn: the union of some label values (LV epicardium = cavity + myocardium)."""

    name: str
    title: str
    labels: tuple[int, ...]
    colour: str


# Label values of every label map in the project (CAMUS convention; phantoms, checkpoints, NRRD masks).
LABELS: tuple[Label, ...] = (
    Label(0, "background", "background"),
    Label(1, "lv_cavity", "LV cavity", ("lv_endo",)),
    Label(2, "lv_myocardium", "LV myocardium", ("lv_myo",)),
    Label(3, "la", "LA"),
)
SEG_LABELS: tuple[str, ...] = tuple(lab.name for lab in LABELS)     # names by value, as in checkpoints
LABEL_TEXT = ", ".join(f"{lab.value} {lab.title}" for lab in LABELS)   # "0 background, 1 LV cavity, ..."

# Structures scored by segmentation metrics (in report order) and drawn as contours.
STRUCTURES: tuple[Structure, ...] = (
    Structure("lv_endo", "LV endo", (1,), "#e6194b"),
    Structure("lv_epi", "LV epi", (1, 2), "#3cb44b"),
    Structure("la", "LA", (3,), "#4363d8"),
)
STRUCTURE_LABELS: dict[str, tuple[int, ...]] = {s.name: s.labels for s in STRUCTURES}
DRAW_ORDER = ("lv_epi", "la", "lv_endo")   # contours outer first, so the endocardium stays visible

_BY_NAME = {alias: lab for lab in LABELS for alias in (lab.name, *lab.aliases)}


def canonical_label(name: str) -> str:
    """The canonical name of a label (``lv_endo`` -> ``lv_cavity``); ValueError for an unknown name."""
    lab = _BY_NAME.get(str(name).strip().lower())
    if lab is None:
        raise ValueError(f"unknown structure label {name!r}; expected one of {list(_BY_NAME)}")
    return lab.name


def canonical_labels(names) -> list[str]:
    """Segmentation label names as read from a file, the older names (``lv_endo``, ``lv_myo``) brought
    to the canonical ones; names outside the vocabulary (a custom label map) are kept as they are."""
    return [_BY_NAME[str(n).strip().lower()].name if str(n).strip().lower() in _BY_NAME else n for n in names]


class LabelValues(dict):
    """``{name: label value}`` over :data:`LABELS` (canonical names; a plain dict to JSON), which also
    answers the older names (``LABELS["lv_endo"] == 1``) that code and files still use."""

    def __missing__(self, name):
        lab = _BY_NAME.get(name)
        if lab is None:
            raise KeyError(name)
        return lab.value

    def get(self, name, default=None):
        return self[name] if name in _BY_NAME else default


LABEL_VALUES = LabelValues((lab.name, lab.value) for lab in LABELS)


def structures_for(n_classes: int) -> dict[str, tuple[int, ...]]:
    """The structures a label map of ``n_classes`` values can score (4: LV endo, LV epi, LA;
    2, e.g. EchoNet-Dynamic's LV masks: LV endo)."""
    return {s.name: s.labels for s in STRUCTURES if max(s.labels) < n_classes}


# ------------------------------------------------------------------ other class vocabularies
TMED2_VIEWS = ("A2C", "A4C", "PLAX", "PSAX", "other")
AR_VIEWS = ("A3C", "A5C", "PSAX", "PLAX")
AR_BINARY = ("non_severe", "severe")


# ------------------------------------------------------------------ tasks
# Options of a new task head (a fine-tuning config's ``head`` section; docs/finetuning.md explains each).
HEAD_DEFAULTS = {
    "norm": True,            # LayerNorm on the pooled tokens (pooled heads)
    "dropout": 0.0,
    "width": 16,             # segment: decoder channels at full resolution
    "layers": None,          # segment: encoder blocks feeding the decoder (None: evenly spaced)
    "frame_model": False,    # segment: the 2D per-frame variant
    "fusion": "attention",   # ar: attention | mean over the available views
}


@dataclass(frozen=True)
class Task:
    """One downstream task. ``heads``: head kinds that may serve it (:mod:`.models.heads`), the first
    is built for a new model unless a ``head_options`` flag of the config picks another;
    ``classes``: default output names (a dataset may bring its own); ``n_outputs``: fixed number
    of label names (None: one per class); ``targets``: item keys the loss reads;
    ``select_metric``/``higher_is_better``: the validation metric the best model is kept by;
    ``loss``: a name in :data:`EchoFMEngine.training.task_eval.LOSSES`, computed on ``targets``;
    ``frames_policy``: how clips are cut from a cine by default (the data layer records ``still``
    for still-image datasets and ``per_frame`` for the 2D segmenter); ``analysis``: where a cine's
    analysis puts the output (``view``, ``scores.<key>``, ``masks``; empty: not scored per cine,
    ``analysis_note`` says why)."""

    name: str
    title: str
    kind: str
    heads: tuple[str, ...]
    classes: tuple[str, ...]
    targets: tuple[str, ...]
    loss: str
    metrics: tuple[str, ...]
    select_metric: str
    higher_is_better: bool
    vocabulary: str = "classes"            # "classes" (names in the checkpoint) or "structures" (LABELS)
    head_options: tuple[tuple[str, str], ...] = ()   # (config head flag, head kind it selects)
    n_outputs: Optional[int] = None
    views: tuple[str, ...] = ()            # multi-view slots of one study, in input order
    frames_policy: str = "cycle"
    unit: Optional[str] = None
    analysis: str = ""
    analysis_note: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.select_metric not in self.metrics:
            raise ValueError(f"task {self.name!r}: select_metric {self.select_metric!r} is not in its metrics")

    def head_kind(self, options: Optional[Mapping] = None) -> str:
        """The head kind a new model of this task gets under config ``head`` ``options``."""
        for flag, kind in self.head_options:
            if options and options.get(flag):
                return kind
        return self.heads[0]

    @property
    def score_key(self) -> str:
        """Key of the task's entry in an analysis result's ``scores`` ("" when it has none)."""
        return self.analysis.partition(".")[2] if self.analysis.startswith("scores.") else ""

    @property
    def eval_title(self) -> str:
        """Title of the task in reports and figures ("view", "AS", ...)."""
        return self.name if self.name == "view" else self.name.upper()


_CLASS_METRICS = ("accuracy", "precision", "recall", "f1", "auroc", "loss", "confusion_matrix", "n")

TASKS: tuple[Task, ...] = (
    Task("view", "view identification (A2C, A4C, PLAX, PSAX, other)", CLASSIFICATION,
         heads=("classifier",), classes=TMED2_VIEWS, targets=("label",), loss="cross_entropy",
         metrics=_CLASS_METRICS, select_metric="accuracy", higher_is_better=True, analysis="view"),
    Task("segment", "LV endocardium / epicardium and LA segmentation", SEGMENTATION,
         heads=("segmenter", "frame_segmenter"), head_options=(("frame_model", "frame_segmenter"),),
         classes=SEG_LABELS, targets=("masks", "mask_valid"), loss="cross_entropy+dice",
         metrics=("mean_dice", "mean_dice_ci95", "structures", "n_frames"), select_metric="mean_dice",
         higher_is_better=True, vocabulary="structures", analysis="masks"),
    Task("as", "aortic stenosis screening", CLASSIFICATION,
         heads=("classifier",), classes=("absent", "present"), targets=("label",), loss="cross_entropy",
         metrics=_CLASS_METRICS, select_metric="auroc", higher_is_better=True, analysis="scores.as"),
    Task("ar", "aortic regurgitation severity (multi-view colour Doppler)", CLASSIFICATION,
         heads=("multiview",), classes=AR_BINARY, n_outputs=2, views=AR_VIEWS,
         targets=("label", "severity", "view_valid"), loss="binary_cross_entropy+severity_mse",
         metrics=_CLASS_METRICS + ("severity_mae", "severity_rmse"), select_metric="auroc", higher_is_better=True,
         analysis_note="AR severity is scored per study from several colour Doppler views (A3C, A5C, PSAX, "
                       "PLAX); a single cine cannot be scored"),
    Task("ef", "direct LVEF regression", REGRESSION,
         heads=("regressor",), classes=("ef_percent",), n_outputs=1, targets=("ef",), loss="mse",
         metrics=("r2", "mae", "rmse", "bias", "n"), select_metric="mae", higher_is_better=False, unit="%",
         analysis="scores.ef_regression"),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
_REGISTRY = {t.name: t for t in TASKS}
if len(_REGISTRY) != len(TASKS):
    raise RuntimeError("two tasks share a name in EchoFMEngine.tasks.TASKS")


def get_task(name: str) -> Task:
    """The task called ``name``; ValueError naming the known tasks otherwise."""
    task = _REGISTRY.get(name) if isinstance(name, str) else None
    if task is None:
        raise ValueError(f"unknown task {name!r}; expected one of {list(TASK_NAMES)}")
    return task


def tasks_of(kind: Optional[str] = None, analysed: Optional[bool] = None) -> tuple[str, ...]:
    """Task names in registry order, only those of ``kind`` and/or (``analysed``) those a cine's
    analysis runs."""
    return tuple(t.name for t in TASKS if (kind is None or t.kind == kind)
                 and (analysed is None or bool(t.analysis) == analysed))
