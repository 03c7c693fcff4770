"""Self-describing fine-tuned task models: one folder = ``model.safetensors`` + ``config.json``.

The description (also inside the safetensors metadata, so the weights file alone is enough) says
what the model does and what it takes, so the analysis pipeline and the Slicer module can load it
without any other configuration::

    {"format": "echofm-task-v1", "task": "view" | "segment" | "as" | "ar" | "ef",
     "labels": [class names] (segment: label-map names by value; ef: ["ef_percent"]),
     "input": {"frames", "height", "width", "channels", "value_range", "layout"},
     "preprocessing": {"sector_crop", "size", "frames_policy", ...},
     "encoder_config": EchoFMConfig dict, "head": {"kind", ...head_config()},
     "metrics": {...held-out numbers} (optional), "trained_on": dataset name, ...}

Segmenters in the retired ``echofm-segmenter-v1`` layout (what the demo wrote before 0.2; nothing
writes it now) load here too, their description brought to the same keys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..tasks import TASK_NAMES as TASKS
from ..tasks import TASKS as _SPECS
from ..tasks import canonical_labels, get_task
from .checkpoint import FORMAT as ENCODER_FORMAT
from .checkpoint import CheckpointError, weights_file
from .config import EchoFMConfig
from .echofm import EchoFM
from .heads import ENCODER_UNUSED, EncoderModel, build_task_head

FORMAT = "echofm-task-v1"
LEGACY_SEGMENTER = "echofm-segmenter-v1"
REQUIRED = ("task", "labels", "input", "preprocessing", "trained_on")
INPUT_KEYS = ("frames", "height", "width", "channels", "value_range", "layout")
TASK_KINDS = {t.name: t.heads for t in _SPECS}     # which head kinds can serve which task


def _unused(key: str) -> bool:
    return key.startswith(tuple(f"encoder.{u}" for u in ENCODER_UNUSED))


def check_description(desc: dict, where: str = "description") -> None:
    """Raise ValueError naming the key when ``desc`` lacks what contract C requires."""
    missing = [k for k in REQUIRED if k not in desc]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    if desc["task"] not in TASKS:
        raise ValueError(f"{where}: task {desc['task']!r} is not one of {list(TASKS)}")
    labels = desc["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{where}: 'labels' must be a non-empty list of names, got {desc['labels']!r}")
    absent = [k for k in INPUT_KEYS if k not in (desc["input"] or {})]
    if absent:
        raise ValueError(f"{where}: 'input' lacks {absent}")
    if not isinstance(desc["preprocessing"], dict):
        raise ValueError(f"{where}: 'preprocessing' must be a mapping")


def _n_outputs(task: str, head: dict) -> Optional[int]:
    """Number of label names a ``task`` model with ``head`` (its head_config) needs."""
    fixed = get_task(task).n_outputs
    return int(head["n_classes"]) if fixed is None else fixed


def save_task_model(model: EncoderModel, folder: Union[str, Path], description: dict) -> Path:
    """Write ``model`` into ``folder`` (created) with ``description`` completed by the model's own
    facts (``format``, ``encoder_config``, ``head``); returns the folder.

    The unused MAE decoder and projector are not written. ``description`` must hold ``task``,
    ``labels``, ``input``, ``preprocessing`` and ``trained_on`` (ValueError naming the key otherwise),
    and as many labels as the model has outputs."""
    head = model.head_config()
    desc = {**description, "format": FORMAT, "encoder_config": model.cfg.to_dict(), "head": head}
    check_description(desc)
    if head["kind"] not in TASK_KINDS[desc["task"]]:
        raise ValueError(f"a {head['kind']} model cannot be saved as task {desc['task']!r} "
                         f"(expected {TASK_KINDS[desc['task']]})")
    n = _n_outputs(desc["task"], head)
    if len(desc["labels"]) != n:
        raise ValueError(f"description names {len(desc['labels'])} labels {desc['labels']} but the model has "
                         f"{n} outputs")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not _unused(k)}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "description": json.dumps(desc)})
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(desc, indent=2))
    return out


def _legacy_description(desc: dict) -> dict:
    """An ``echofm-segmenter-v1`` description with contract C's keys."""
    c = desc["encoder_config"]
    labels = desc.get("labels", {})
    if isinstance(labels, dict):
        labels = [labels[k] for k in sorted(labels, key=int)]
    head = {"kind": "segmenter", "n_classes": desc["n_classes"], **desc["head"]}
    return {**desc, "labels": labels, "head": head,
            "preprocessing": desc.get("preprocessing", {"sector_crop": True, "size": c["img_size"],
                                                         "frames_policy": get_task("segment").frames_policy}),
            "trained_on": desc.get("trained_on", "unknown")}


def read_task_description(path: Union[str, Path]) -> dict:
    """The description of a task checkpoint (folder or ``.safetensors`` file), no weights loaded.

    CheckpointError naming the file for an encoder-only checkpoint or any other file."""
    file = weights_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any unreadable file is a checkpoint error for the caller
        raise CheckpointError(f"{file}: not a safetensors file ({e})") from None
    fmt = meta.get("format")
    if fmt == ENCODER_FORMAT:
        raise CheckpointError(f"{file}: an encoder-only EchoFM checkpoint (pretraining output), not a fine-tuned "
                              f"task model; fine-tune it first (python train.py --config "
                              f"Resources/configs/finetune_<task>.yaml init_from={file})")
    if fmt not in (FORMAT, LEGACY_SEGMENTER) or "description" not in meta:
        raise CheckpointError(f"{file}: not an EchoFM task checkpoint (format={fmt!r})")
    desc = json.loads(meta["description"])
    desc = _legacy_description(desc) if fmt == LEGACY_SEGMENTER else desc
    if desc.get("task") in TASKS and get_task(desc["task"]).vocabulary == "structures" \
            and isinstance(desc.get("labels"), list):
        desc["labels"] = canonical_labels(desc["labels"])     # older names (lv_endo, lv_myo) -> canonical
    return desc


def check_task(desc: dict, task: Optional[str], file) -> None:
    """CheckpointError naming the file, its task and the expected one when they differ."""
    if task is not None and desc.get("task") != task:
        raise CheckpointError(f"{file}: checkpoint of task {desc.get('task')!r} ({desc['head'].get('kind')} model), "
                              f"but task {task!r} was expected")


def build_from_description(desc: dict, freeze_encoder: bool = False) -> EncoderModel:
    """An untrained model shaped as ``desc`` says (encoder config + head)."""
    encoder = EchoFM(EchoFMConfig.from_dict(desc["encoder_config"]))
    return build_task_head(encoder, desc["head"], freeze_encoder=freeze_encoder)


def validate_task_file(file, desc: dict) -> None:
    """Check the description against the tensors before anything is allocated: the head suits the
    task, the labels match the outputs, and every tensor's name and shape match the model the
    description builds (built on the meta device: a 1 KB file claiming a huge encoder costs nothing).
    CheckpointError naming the file otherwise."""
    try:
        check_description(desc, where=f"{file}: description")
        kind = (desc.get("head") or {}).get("kind")
        if kind not in TASK_KINDS[desc["task"]]:
            raise ValueError(f"a {kind!r} head cannot serve task {desc['task']!r} (expected {TASK_KINDS[desc['task']]})")
        with torch.device("meta"):
            model = build_from_description(desc)
        n = _n_outputs(desc["task"], desc["head"])
        if get_task(desc["task"]).n_outputs is None and len(desc["labels"]) != n:
            raise ValueError(f"description names {len(desc['labels'])} labels but the head has {n} outputs")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a description that builds no model is a checkpoint error
        raise CheckpointError(f"{file}: description does not describe a model: {e}") from None
    with safe_open(str(file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not _unused(k)}
    bad = [f"{k} {shapes[k]} vs {own[k]}" for k in shapes if k in own and shapes[k] != own[k]]
    if bad:
        raise CheckpointError(f"{file}: tensor shapes differ from the description: {bad[:5]}")
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own and not _unused(k)]
    if missing or unexpected:
        raise CheckpointError(f"{file}: tensors do not match the description: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def load_task_model(path: Union[str, Path], task: Optional[str] = None, map_location="cpu") -> EncoderModel:
    """The model of a task checkpoint, in eval mode, with ``model.description``.

    ``task`` given and different from the checkpoint's -> CheckpointError naming the file and both
    tasks; an encoder-only checkpoint or another file -> CheckpointError naming the file."""
    file = weights_file(path)
    if task is not None and task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {list(TASKS)}")
    desc = read_task_description(file)
    check_task(desc, task, file)
    validate_task_file(file, desc)
    try:
        model = build_from_description(desc)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: description does not describe a model: {e}") from None
    with safe_open(str(file), framework="pt", device=str(map_location)) as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    own = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{file}: tensor shapes differ from the description: {bad[:5]}")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not _unused(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{file}: missing keys {missing[:10]}, unexpected keys {result.unexpected_keys[:10]}")
    model.description = desc
    return model.to(map_location).eval()
