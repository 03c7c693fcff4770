"""EchoFM engine: the echocardiography foundation model, its data layer, training and analysis.

Qt-free and Slicer-free: usable from Python, from ``python -m EchoFMEngine``, from the Slicer
Python console and from headless Slicer. Heavy submodules are imported on first use.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
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
    "propagate_masks": ("EchoFMEngine.clinical.propagate", "propagate_masks"),
    "detect_ed_es": ("EchoFMEngine.clinical.phase", "detect_ed_es"),
    "lv_volume_ml": ("EchoFMEngine.clinical.measure", "lv_volume_ml"),
    "build_dataset": ("EchoFMEngine.data", "build_dataset"),
}


# Modules that moved in the 0.2 layout. Their old import paths keep working (users' scripts and notebooks
# import them) and warn once; the old name is the same module object, so monkeypatching either works.
MOVED = {
    **{f"EchoFMEngine.{name}": f"EchoFMEngine.clinical.{name}"
       for name in ("ecg", "cycles", "image_beats", "phase", "phase_strip", "measure", "geometry", "propagate")},
    "EchoFMEngine.synthetic": "EchoFMEngine.clinical.phantoms",
    "EchoFMEngine.training.distributed": "EchoFMEngine.runtime.distributed",
    "EchoFMEngine.analysis.provenance": "EchoFMEngine.models.provenance",
    "EchoFMEngine.training.demo": "EchoFMEngine.demo",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path in :data:`MOVED` to the module at its new place."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path will be removed in a later release",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'EchoFMEngine' has no attribute {name!r}")


__all__ = ["Cine", "CineReadError", "Ecg", "SourceInfo", *_LAZY]
