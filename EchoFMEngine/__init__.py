"""EchoFM engine: the echocardiography foundation model, its data layer, training and analysis.

Qt-free and Slicer-free: usable from Python, from ``python -m EchoFMEngine``, from the Slicer
Python console and from headless Slicer. Heavy submodules are imported on first use.
"""
from __future__ import annotations

import importlib
import warnings

# wfdb (imported by neurokit2 and our WFDB reader) calls pandas' deprecated set_index(inplace=True) on
# import; the warning is wfdb's to fix, not the user's, so it is hidden wherever wfdb gets imported.
warnings.filterwarnings("ignore", message=r".*inplace keyword.*", module=r"wfdb")

from .cine import Cine, CineReadError, Ecg, SourceInfo

__version__ = "0.1.0"

_LAZY = {
    "load_cine": ("EchoFMEngine.io", "load_cine"),
    "build_echofm": ("EchoFMEngine.models", "build_echofm"),
    "load_official_checkpoint": ("EchoFMEngine.models", "load_official_checkpoint"),
    "analyze": ("EchoFMEngine.analysis", "analyze"),
    "propagate_masks": ("EchoFMEngine.propagate", "propagate_masks"),
    "detect_ed_es": ("EchoFMEngine.phase", "detect_ed_es"),
    "lv_volume_ml": ("EchoFMEngine.measure", "lv_volume_ml"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'EchoFMEngine' has no attribute {name!r}")


__all__ = ["Cine", "CineReadError", "Ecg", "SourceInfo", *_LAZY]
