#!/usr/bin/env python
"""EchoFM training entry point.

    python train.py                                   # the demo: phantoms -> pretrain -> report
    python train.py --config Resources/configs/X.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node=N train.py --config ...
    Slicer --no-main-window --python-script train.py --config ...

Runs the same way under plain Python and headless 3D Slicer, and always ends with an explicit
exit status (0 success, 1 error, 2 usage or config error, 3 missing packages).
"""
from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# import name -> pip package, for everything a training run needs
REQUIRED = {"torch": "torch", "timm": "timm", "einops": "einops", "numpy": "numpy", "scipy": "scipy",
            "yaml": "pyyaml", "safetensors": "safetensors", "tqdm": "tqdm", "skimage": "scikit-image",
            "pydicom": "pydicom", "neurokit2": "neurokit2", "SimpleITK": "SimpleITK", "av": "av",
            "matplotlib": "matplotlib", "sklearn": "scikit-learn", "pandas": "pandas"}


def missing_packages() -> list[str]:
    """pip names of required packages that cannot be imported here (Slicer's Python lacks some)."""
    return [pip for mod, pip in REQUIRED.items() if importlib.util.find_spec(mod) is None]


def main(argv: list[str]) -> int:
    missing = missing_packages()
    if missing:
        print("error: this Python lacks packages EchoFM needs: " + ", ".join(missing) +
              f"\ninstall them with: {sys.executable} -m pip install " + " ".join(missing), file=sys.stderr)
        return 3
    if HERE not in sys.path and importlib.util.find_spec("EchoFMEngine") is None:
        sys.path.insert(0, HERE)  # source checkout (e.g. Slicer without the extension installed)
    if not argv or argv[0] == "demo":
        from EchoFMEngine.training.demo import cli as demo
        return demo(argv[1:])
    from EchoFMEngine.training.entry import cli as run
    return run(argv)


def _exit(code: int) -> None:
    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "util") and hasattr(slicer, "app"):
        slicer.util.exit(code)  # headless Slicer: quit the application with this status
    sys.exit(code)


if __name__ == "__main__":
    _exit(main(sys.argv[1:]))
