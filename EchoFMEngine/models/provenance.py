"""Which model, file and method produced each output of an analysis (written into every result).

A model's provenance comes from its own description (task, labels, ``trained_on``, creation date)
and from the models folder's manifest (file SHA-256, import date). A model whose ``trained_on``
names phantoms (synthetic studies) is marked ``trained_on_phantoms``: its output on a real cine is
flagged, since phantom training does not carry over to real anatomy.
"""
from __future__ import annotations

from typing import Mapping, Optional

PHANTOM_WORDS = ("phantom", "synthetic", "simulated")


def trained_on_phantoms(trained_on) -> Optional[bool]:
    """True when the training-data description names phantoms, False for other data, None if unknown."""
    if trained_on is None:
        return None
    text = str(trained_on).strip().lower()
    if not text or text == "unknown":
        return None
    return any(w in text for w in PHANTOM_WORDS)


def model_provenance(task: str, description: Optional[dict] = None, entry: Optional[dict] = None) -> dict:
    """Provenance of one task model from its description and its manifest entry (either may be missing)."""
    d, e = dict(description or {}), dict(entry or {})
    trained_on = d.get("trained_on", e.get("trained_on"))
    return {"task": task, "file": e.get("file"), "sha256": e.get("sha256") or d.get("sha256"),
            "trained_on": trained_on if trained_on is not None else "unknown",
            "trained_on_phantoms": trained_on_phantoms(trained_on),
            "created": d.get("created") or d.get("date") or e.get("created"),
            "imported_at": e.get("imported_at"), "labels": d.get("labels", e.get("labels")),
            "format": d.get("format", e.get("format"))}


def store_provenance(store) -> dict:
    """``{task: provenance}`` for every task model listed in a :class:`ModelStore` (no weights loaded)."""
    from .task_checkpoint import read_task_description  # deferred on purpose: torch, which this module does without

    out = {}
    for task, entry in store.entries().items():
        desc = None
        try:
            desc = read_task_description(store.folder / entry["file"])
        except Exception:  # noqa: BLE001 - a missing or unreadable file still lists its manifest facts
            desc = None
        out[task] = model_provenance(task, desc, entry)
    return out


def models_provenance(models: Mapping) -> dict:
    """``{task: provenance}`` of loaded models (an analysis ``ModelSet`` carries it per task;
    plain ``{task: model}`` mappings give what the model's description says)."""
    known = getattr(models, "provenance", {}) or {}
    out = {}
    for task, model in models.items():
        out[task] = known.get(task) or model_provenance(task, getattr(model, "description", None))
    return out


def is_phantom_cine(cine) -> bool:
    """True for the project's own phantoms (in memory or written as DICOM by ``synthetic.write_dicom``)."""
    src = cine.source
    text = " ".join(str(v) for v in (src.format, src.scanner_model, src.series_description) if v)
    return "phantom" in text.lower()
