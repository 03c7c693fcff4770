"""Run configuration: a YAML file plus ``key=value`` overrides, checked against the known keys.

The known keys depend on the config's ``task``: pretraining (:data:`DEFAULTS`) or a fine-tuning
task (:data:`FINETUNE_DEFAULTS` with per-task changes, :func:`defaults_for`)."""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Optional, Union

import yaml

# Every key a pretraining config may hold, with its default. Model keys are checked by EchoFMConfig.
DEFAULTS = {
    "task": "pretrain",
    "model": {"preset": "tiny"},
    "init_from": None,           # released EchoFM file or a folder written by save_pretrained
    "data": {
        "kind": "phantom",       # phantom | cache | folder
        "root": None,
        "n_studies": 16,         # phantom only
        "seed": 0,
        "num_workers": 0,
    },
    "optim": {
        "base_lr": 1.0e-3,       # lr = base_lr * global_batch / 256
        "weight_decay": 0.05,
        "betas": [0.9, 0.95],
        "warmup_steps": 10,
        "min_lr": 0.0,
        "clip_grad": 1.0,        # max gradient norm; null to disable
        "accum_steps": 1,
    },
    "run": {
        "out": "runs/pretrain",
        "steps": 100,
        "batch_size": 4,         # per process, per accumulation step
        "seed": 0,
        "amp": "auto",           # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
        "compile": False,
        "compile_mode": "default",  # default | reduce-overhead (CUDA graphs) | max-autotune
        "device": "auto",        # auto | cpu | cuda
        "ckpt_every": 50,
        "keep_last": 3,
        "log_every": 1,
        "tensorboard": True,
    },
}


FINETUNE_TASKS = ("view", "segment", "as", "ar", "ef")

# Every key a fine-tuning config may hold, the same for all five tasks (docs/finetuning.md explains each).
FINETUNE_DEFAULTS = {
    "task": "view",
    "model": {"preset": "tiny"},  # the video encoder (EchoFMConfig keys), as in pretraining
    "init_from": None,           # pretrained encoder (our folder, released EchoFM, VideoMAE) or a task checkpoint
    "head": {
        "mode": "full",          # full (layer-wise lr decay) | frozen (encoder fixed, head only)
        "norm": True,            # LayerNorm on the pooled tokens (pooled heads)
        "dropout": 0.0,
        "width": 16,             # segment: decoder channels at full resolution
        "layers": None,          # segment: encoder blocks feeding the decoder (None: evenly spaced)
        "frame_model": False,    # segment: the 2D per-frame variant
        "fusion": "attention",   # ar: attention | mean over the available views
        "severity_weight": 1.0,  # ar: weight of the severity regression loss next to the severe/not loss
    },
    "data": {
        "kind": "phantom",       # phantom | tmed2 | camus | echonet | ar_multiview | csv
        "root": None,
        "csv_file": None,        # csv / tmed2 / ar_multiview: the label file (relative to root)
        "label_column": None,    # csv: the column holding the label (view/as) or the value (ef)
        "classes": None,         # csv: class names of the label column (default: the task's)
        "as_task": "as_presence",  # tmed2/csv: as_presence | as_early_vs_significant | as_significant | as_grade
        "views": None,           # tmed2: keep these views only; camus: 2CH and/or 4CH
        "frames": None,          # clip length read from the data (None: the encoder's num_frames)
        "train_split": "train",
        "val_split": "val",      # null: hold out val_fraction of the training split (stratified)
        "test_split": "test",    # null: no test evaluation
        "val_fraction": 0.2,
        "label_fraction": 1.0,   # 0 < f <= 1: seeded, class-stratified share of the training labels
        "n_train": 24,           # phantom studies per split
        "n_val": 8,
        "n_test": 8,
        "seed": 0,
        "augment": True,         # the paper's augmentations (segment: affine + erasing; others: flips)
        "num_workers": 0,
    },
    "optim": {
        "lr": 1.0e-3,            # head learning rate (absolute); encoder blocks get lr * layer_decay**k
        "layer_decay": 0.75,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "warmup_steps": 10,
        "min_lr": 0.0,
        "clip_grad": 1.0,
    },
    "run": {
        "out": "runs/finetune",
        "steps": 100,
        "batch_size": 8,
        "eval_batch_size": 8,
        "seed": 0,
        "amp": "auto",           # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
        "device": "auto",
        "eval_every": 25,        # validation (and best-model selection) every N steps and at the end
        "select_metric": "auto",  # auto: view accuracy, as/ar auroc, ef mae, segment mean_dice
        "ckpt_every": 25,
        "keep_last": 2,
        "log_every": 5,
        "tensorboard": False,
    },
}


def defaults_for(task: str) -> dict:
    """The known keys and defaults of a config for ``task`` ('pretrain' or a fine-tuning task)."""
    if task == "pretrain":
        return copy.deepcopy(DEFAULTS)
    if task not in FINETUNE_TASKS:
        raise ConfigError(f"unknown task {task!r}; expected 'pretrain' or one of {list(FINETUNE_TASKS)}")
    return _merge(FINETUNE_DEFAULTS, {"task": task})


class ConfigError(KeyError):
    """An unknown or malformed configuration key; the message names it and suggests the closest."""

    def __str__(self):
        return str(self.args[0])


def _all_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys += _all_keys(v, f"{prefix}{k}.")
    return keys


def _coerce(value, default, name: str, source: str):
    """Numbers written like ``1e-3`` load from YAML as strings: read them as numbers; refuse
    values whose type cannot match the default's."""
    if isinstance(default, bool) or default is None or isinstance(default, (str, list)):
        return value
    if isinstance(default, (int, float)) and isinstance(value, str):
        try:
            return float(value) if isinstance(default, float) or not value.lstrip("-").isdigit() else int(value)
        except ValueError:
            raise ConfigError(f"{source}: {name!r} must be a number, got {value!r}") from None
    return value


def _check_known(cfg: dict, defaults: dict, prefix: str = "", source: str = "config",
                 root: Optional[dict] = None) -> None:
    """Raise on unknown keys (naming the closest known one); coerce numeric strings in place."""
    root = defaults if root is None else root
    for key, value in list(cfg.items()):
        full = prefix + key
        if prefix == "model.":
            continue                          # model keys are validated by EchoFMConfig
        if key not in defaults:
            close = difflib.get_close_matches(full, _all_keys(root), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {full!r}{hint}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full!r} must be a mapping")
            _check_known(value, defaults[key], full + ".", source, root)
        else:
            cfg[key] = _coerce(value, defaults[key], full, source)


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], object]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def load_config(path: Union[str, Path, None] = None, overrides: list[str] = ()) -> dict:
    """Defaults of the config's task <- YAML file <- overrides, with every key checked.

    The task is the file's ``task`` (a ``task=...`` override wins), 'pretrain' when neither says."""
    loaded: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(loaded).__name__}")
    updates = []
    for text in overrides:
        keys, value = parse_override(text)
        update = value
        for k in reversed(keys):
            update = {k: update}
        updates.append(update)
    task = next((u["task"] for u in reversed(updates) if "task" in u), loaded.get("task", "pretrain"))
    defaults = defaults_for(task)
    cfg = copy.deepcopy(defaults)
    if loaded:
        _check_known(loaded, defaults, source=str(path))
        cfg = _merge(cfg, loaded)
    for update in updates:
        _check_known(update, defaults, source="override")
        cfg = _merge(cfg, update)
    if isinstance(cfg.get("init_from"), str) and cfg["init_from"].startswith("models:"):
        from ..models.registry import resolve_ref      # `init_from: models:echofm-vitl` -> checked file

        cfg["init_from"] = resolve_ref(cfg["init_from"])
    return cfg


def dump_config(cfg: dict, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
