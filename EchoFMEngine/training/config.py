"""Run configuration: a YAML file plus ``key=value`` overrides, checked against the known keys.

The known keys depend on the config's ``task``: pretraining (:data:`DEFAULTS`) or a fine-tuning
task (:data:`FINETUNE_DEFAULTS` with per-task changes, :func:`defaults_for`). Every value is then
validated by type and range with pydantic (:data:`PRETRAIN_TYPES`, :data:`FINETUNE_TYPES`) before
anything runs; one :class:`ConfigError` lists every bad key (unknown keys with the closest known one)."""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Optional, Union

import yaml
from pydantic import Field, StrictBool, StrictInt, TypeAdapter, ValidationError
from typing import Annotated, Literal

from ..configs import find_config
from ..tasks import HEAD_DEFAULTS
from ..tasks import TASK_NAMES as FINETUNE_TASKS
from ..models.registry import resolve_ref

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


# Every key a fine-tuning config may hold, the same for every task (docs/finetuning.md explains each).
FINETUNE_DEFAULTS = {
    "task": "view",
    "model": {"preset": "tiny"},  # the video encoder (EchoFMConfig keys), as in pretraining
    "init_from": None,           # pretrained encoder (our folder, released EchoFM, VideoMAE) or a task checkpoint
    "head": {
        "mode": "full",          # full (layer-wise lr decay) | frozen (encoder fixed, head only)
        **HEAD_DEFAULTS,         # norm, dropout, width, layers, frame_model, fusion (EchoFMEngine.tasks)
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
        "propagated_weight": 1.0,  # segment: loss weight of frames whose mask was propagated (0 = exclude them)
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
        "compile": False,        # torch.compile the training forward (worth it on GPUs; minutes to compile on CPU)
        "compile_mode": "default",  # default | reduce-overhead (CUDA graphs) | max-autotune
    },
}


# Types and ranges of the values (pydantic strict types: 2.5 or true is not an int).
Count = Annotated[StrictInt, Field(ge=1)]
NonNeg = Annotated[StrictInt, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction01 = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
Betas = Annotated[list[Beta], Field(min_length=2, max_length=2)]
Text = Annotated[str, Field(min_length=1)]
Amp = Literal["auto", "bf16", "fp16", "fp32"]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
_COMMON_TYPES = {
    "init_from": Optional[Text],
    "run.out": Text, "run.steps": Count, "run.batch_size": Count, "run.seed": NonNeg, "run.amp": Amp,
    "run.device": Device, "run.ckpt_every": Count, "run.keep_last": NonNeg, "run.log_every": Count,
    "run.tensorboard": StrictBool,
    "run.compile": StrictBool, "run.compile_mode": Literal["default", "reduce-overhead", "max-autotune"],
    "optim.weight_decay": NonNegFloat, "optim.betas": Betas, "optim.warmup_steps": NonNeg,
    "optim.min_lr": NonNegFloat, "optim.clip_grad": Optional[PosFloat],
    "data.root": Optional[Text], "data.seed": NonNeg, "data.num_workers": NonNeg,
}
PRETRAIN_TYPES = {
    **_COMMON_TYPES,
    "task": Literal["pretrain"], "data.kind": Literal["phantom", "cache", "folder"], "data.n_studies": Count,
    "optim.base_lr": NonNegFloat, "optim.accum_steps": Count,
}
FINETUNE_TYPES = {
    **_COMMON_TYPES,
    "task": Literal[FINETUNE_TASKS], "head.mode": Literal["full", "frozen"], "head.norm": StrictBool,
    "head.dropout": Annotated[float, Field(ge=0, lt=1)], "head.width": Count,
    "head.layers": Optional[list[NonNeg]], "head.frame_model": StrictBool,
    "head.fusion": Literal["attention", "mean"], "head.severity_weight": NonNegFloat,
    "data.kind": Literal["phantom", "tmed2", "camus", "echonet", "ar_multiview", "csv"],
    "data.csv_file": Optional[Text], "data.label_column": Optional[Text], "data.classes": Optional[list[Text]],
    "data.as_task": Literal["as_presence", "as_early_vs_significant", "as_significant", "as_grade"],
    "data.views": Optional[list[Text]], "data.frames": Optional[Count],
    "data.train_split": Text, "data.val_split": Optional[Text], "data.test_split": Optional[Text],
    "data.val_fraction": Annotated[float, Field(gt=0, lt=1)], "data.label_fraction": Fraction01,
    "data.n_train": NonNeg, "data.n_val": NonNeg, "data.n_test": NonNeg, "data.augment": StrictBool,
    "data.propagated_weight": Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)],
    "optim.lr": NonNegFloat, "optim.layer_decay": Fraction01,
    "run.eval_batch_size": Count, "run.eval_every": Count, "run.select_metric": Text,
}
_ADAPTERS: dict = {}


def _get(cfg: dict, key: str):
    for k in key.split("."):
        cfg = cfg[k]
    return cfg


def validate_config(cfg: dict) -> None:
    """Check every value's type and range; one ConfigError listing each bad key with why."""
    table = PRETRAIN_TYPES if cfg.get("task", "pretrain") == "pretrain" else FINETUNE_TYPES
    bad = []
    for key, kind in table.items():
        try:
            value = _get(cfg, key)
        except (KeyError, TypeError):
            continue
        adapter = _ADAPTERS.get(id(kind)) or _ADAPTERS.setdefault(id(kind), TypeAdapter(kind))
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as e:
            why = "; ".join(err["msg"] for err in e.errors()[:2])
            bad.append(f"{key}={value!r}: {why}")
    if bad:
        raise ConfigError(f"invalid config value{'s' if len(bad) > 1 else ''}:\n  " + "\n  ".join(bad))


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
                 root: Optional[dict] = None, errors: Optional[list] = None) -> list:
    """Collect unknown keys (naming the closest known one) into ``errors``; coerce numeric strings
    in place. Raises one ConfigError listing them all when called without ``errors``."""
    root = defaults if root is None else root
    top = errors is None
    errors = [] if top else errors
    for key, value in list(cfg.items()):
        full = prefix + str(key)
        if prefix == "model.":
            continue                          # model keys are validated by EchoFMConfig
        if key not in defaults:
            close = difflib.get_close_matches(full, _all_keys(root), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errors.append(f"{source}: unknown key {full!r}{hint}")
        elif isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                errors.append(f"{source}: {full!r} must be a mapping")
            else:
                _check_known(value, defaults[key], full + ".", source, root, errors)
        else:
            try:
                cfg[key] = _coerce(value, defaults[key], full, source)
            except ConfigError as e:
                errors.append(str(e))
    if top and errors:
        raise ConfigError("\n  ".join(errors))
    return errors


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
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(e)})") from None


def _yaml_problem(e: Exception) -> str:
    """A YAML error in one line: what is wrong and where (line/column, 1-based)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(e, "problem", None) or e).splitlines()[0]


def read_yaml(path: Union[str, Path]) -> dict:
    """A config file (a path or a shipped config's name) as a mapping; ConfigError naming the file for
    bad YAML or a non-mapping."""
    path = find_config(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(loaded).__name__}")
    return loaded


def load_config(path: Union[str, Path, None] = None, overrides: list[str] = ()) -> dict:
    """Defaults of the config's task <- YAML file <- overrides, with every key checked.

    The task is the file's ``task`` (a ``task=...`` override wins), 'pretrain' when neither says."""
    loaded: dict = {}
    if path is not None:
        path = find_config(path)       # a file, or a shipped config's name (finetune_view)
        loaded = read_yaml(path)
    updates = []
    for text in overrides:
        keys, value = parse_override(text)
        update = value
        for k in reversed(keys):
            update = {k: update}
        updates.append(update)
    task = next((u["task"] for u in reversed(updates) if "task" in u), loaded.get("task", "pretrain"))
    if not isinstance(task, str):
        raise ConfigError(f"task must be a name, got {task!r}")
    defaults = defaults_for(task)
    cfg = copy.deepcopy(defaults)
    errors: list = []
    if loaded:
        _check_known(loaded, defaults, source=str(path), errors=errors)
        cfg = _merge(cfg, loaded)
    for update in updates:
        _check_known(update, defaults, source="override", errors=errors)
        cfg = _merge(cfg, update)
    if errors:
        raise ConfigError("\n  ".join(errors))
    validate_config(cfg)
    if isinstance(cfg.get("init_from"), str) and cfg["init_from"].startswith("models:"):
        cfg["init_from"] = resolve_ref(cfg["init_from"])
    return cfg


def dump_config(cfg: dict, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
