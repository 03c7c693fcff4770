"""The EchoFM model, its presets and its checkpoints.

The names below load on first use (PEP 562), so the torch-free parts of this package (``registry``: the
models folder; ``files``: checkpoint errors) import without torch, e.g. in Slicer's panel."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Union

from .config import EchoFMConfig, make_config   # std-lib only

if TYPE_CHECKING:
    from .echofm import EchoFM

_LAZY = {
    "EchoFM": ".echofm",
    "PRESETS": ".config",
    "CheckpointError": ".files",
    "load_official_checkpoint": ".checkpoint", "save_pretrained": ".checkpoint", "load_pretrained": ".checkpoint",
}


def build_echofm(preset_or_config: Union[str, dict, EchoFMConfig] = "vit_l", **overrides) -> EchoFM:
    """Build an EchoFM from a preset name (``tiny``, ``vit_s``, ``vit_b``, ``vit_l``), a dict or a config."""
    from .echofm import EchoFM  # deferred: torch loads when a model is built, not with the package

    return EchoFM(make_config(preset_or_config, **overrides))


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EchoFM", "EchoFMConfig", "PRESETS", "build_echofm", "make_config", "load_official_checkpoint",
           "save_pretrained", "load_pretrained", "CheckpointError"]
