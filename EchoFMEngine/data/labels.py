"""Explicit class lists per dataset and task, and label encoding that names the file, row and value on
error. The vocabularies a task declares (views, structures, AR classes) come from :mod:`EchoFMEngine.tasks`."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from .. import tasks

# Segmentation labels by value (CAMUS convention, also the phantoms'); older names map with tasks.canonical_label.
SEG_CLASSES = list(tasks.SEG_LABELS)

# TMED-2 views. The release writes "A4CorA2CorOther" for the catch-all class.
TMED2_VIEWS = list(tasks.TMED2_VIEWS)
TMED2_VIEW_ALIASES = {"a4cora2corother": "other", "others": "other"}

# TMED-2 study-level aortic stenosis diagnosis, mildest first.
AS_GRADES = ["no_AS", "mild_AS", "mildtomod_AS", "moderate_AS", "severe_AS"]

# Binary AS screening tasks of the paper: grade -> class index (None: not part of the task).
AS_TASKS: dict[str, tuple[list[str], dict[str, Optional[int]]]] = {
    "as_grade": (AS_GRADES, {g: i for i, g in enumerate(AS_GRADES)}),
    "as_presence": (list(tasks.get_task("as").classes),
                    {"no_AS": 0, "mild_AS": 1, "mildtomod_AS": 1, "moderate_AS": 1, "severe_AS": 1}),
    "as_early_vs_significant": (["early", "significant"],
                                {"no_AS": None, "mild_AS": 0, "mildtomod_AS": 0, "moderate_AS": 1,
                                 "severe_AS": 1}),
    "as_significant": (["non_significant", "significant"],
                       {"no_AS": 0, "mild_AS": 0, "mildtomod_AS": 0, "moderate_AS": 1, "severe_AS": 1}),
}

# Multi-view colour Doppler aortic regurgitation.
AR_VIEWS = list(tasks.AR_VIEWS)
AR_SEVERITY_STEPS = [i * 0.5 for i in range(9)]  # 0.0 .. 4.0
AR_SEVERE_FROM = 2.5
AR_BINARY = list(tasks.AR_BINARY)

# Cells that mean "no label here" (the row is left out of that task).
MISSING = {"", "nan", "none", "na", "n/a", "unlabeled", "unlabelled"}


def is_missing(value) -> bool:
    """True for empty/NaN cells and the usual 'no label' words."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip().lower() in MISSING


def encode_label(value, classes: Sequence[str], where: str, row: int, column: str,
                 aliases: Optional[dict] = None) -> int:
    """Index of ``value`` in ``classes`` (case-insensitive, aliases allowed), else a ValueError naming
    the file, row and value."""
    text = str(value).strip()
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    key = text.lower()
    if aliases and key in aliases:
        key = aliases[key].lower()
    if key not in lookup:
        raise ValueError(f"{where}: row {row}: unknown {column} {text!r}; expected one of {list(classes)}")
    return lookup[key]


def parse_float(value, where: str, row: int, column: str) -> float:
    """A finite float, else a ValueError naming the file, row and value."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if not math.isfinite(out):
        raise ValueError(f"{where}: row {row}: {column} {value!r} is not a number")
    return out
