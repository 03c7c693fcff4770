#!/usr/bin/env python
"""EchoFM training entry point.

    python train.py                                   # the demo: phantoms -> pretrain -> report
    python train.py --config Resources/configs/X.yaml [key=value ...] [--resume]
    python train.py --config finetune_view [key=value ...]   # a shipped config by name
    torchrun --nproc_per_node=N train.py --config ...
    Slicer --no-main-window --python-script train.py --config ...

Runs the same way under plain Python and headless 3D Slicer, and always ends with an explicit
exit status (0 success, 1 error, 2 usage or config error, 3 missing packages). The logic lives in
EchoFMEngine/train.py (an installed wheel runs it as ``echofm-train``); this script finds the engine
in a source checkout and exits the Slicer application when it runs inside one.
"""
from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path and importlib.util.find_spec("EchoFMEngine") is None:
    sys.path.insert(0, HERE)  # source checkout (e.g. Slicer without the extension installed)

from EchoFMEngine.train import REQUIRED, main, missing_packages  # noqa: E402,F401 (REQUIRED: public here)


def _exit(code: int) -> None:
    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "util") and hasattr(slicer, "app"):
        slicer.util.exit(code)  # headless Slicer: quit the application with this status
    sys.exit(code)


if __name__ == "__main__":
    _exit(main(sys.argv[1:]))
