"""The EchoFM model, its presets and its checkpoints."""
from __future__ import annotations

from typing import Union

from .checkpoint import (CheckpointError, load_official_checkpoint, load_pretrained, save_pretrained)
from .config import PRESETS, EchoFMConfig, make_config
from .echofm import EchoFM


def build_echofm(preset_or_config: Union[str, dict, EchoFMConfig] = "vit_l", **overrides) -> EchoFM:
    """Build an EchoFM from a preset name (``tiny``, ``vit_s``, ``vit_b``, ``vit_l``), a dict or a config."""
    return EchoFM(make_config(preset_or_config, **overrides))


__all__ = ["EchoFM", "EchoFMConfig", "PRESETS", "build_echofm", "make_config", "load_official_checkpoint",
           "save_pretrained", "load_pretrained", "CheckpointError"]
