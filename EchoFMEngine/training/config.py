"""Run configuration: a YAML file plus ``key=value`` overrides, checked against the known keys."""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Union

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


def _check_known(cfg: dict, defaults: dict, prefix: str = "", source: str = "config") -> None:
    """Raise on unknown keys (naming the closest known one); coerce numeric strings in place."""
    for key, value in list(cfg.items()):
        full = prefix + key
        if prefix == "model.":
            continue                          # model keys are validated by EchoFMConfig
        if key not in defaults:
            close = difflib.get_close_matches(full, _all_keys(DEFAULTS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {full!r}{hint}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full!r} must be a mapping")
            _check_known(value, defaults[key], full + ".", source)
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
    """Defaults <- YAML file <- overrides, with every key checked."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        _check_known(loaded, DEFAULTS, source=str(path))
        cfg = _merge(cfg, loaded)
    for text in overrides:
        keys, value = parse_override(text)
        update = value
        for k in reversed(keys):
            update = {k: update}
        _check_known(update, DEFAULTS, source="override")
        cfg = _merge(cfg, update)
    return cfg


def dump_config(cfg: dict, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
