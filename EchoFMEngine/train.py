"""`python train.py` as part of the engine: the demo with no arguments, else one config run by its ``task:``.

The repository's train.py (plain Python, torchrun, headless Slicer) is a thin script over this module, and
an installed wheel offers the same as ``echofm-train`` and ``python -m EchoFMEngine.train``."""
from __future__ import annotations

import importlib.util
import sys

# import name -> pip package, for everything a training run needs
REQUIRED = {"torch": "torch", "timm": "timm", "einops": "einops", "numpy": "numpy", "scipy": "scipy",
            "yaml": "pyyaml", "safetensors": "safetensors", "tqdm": "tqdm", "skimage": "scikit-image",
            "pydicom": "pydicom", "neurokit2": "neurokit2", "SimpleITK": "SimpleITK", "av": "av",
            "matplotlib": "matplotlib", "sklearn": "scikit-learn", "pandas": "pandas"}


def missing_packages() -> list[str]:
    """pip names of required packages that cannot be imported here (Slicer's Python lacks some)."""
    return [pip for mod, pip in REQUIRED.items() if importlib.util.find_spec(mod) is None]


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 success, 1 run error, 2 bad config or arguments, 3 missing packages."""
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = missing_packages()
    if missing:
        print("error: this Python lacks packages EchoFM needs: " + ", ".join(missing) +
              f"\ninstall them with: {sys.executable} -m pip install " + " ".join(missing), file=sys.stderr)
        return 3
    # The loops import torch: loaded only after the check above could name what is missing.
    if not argv or argv[0] == "demo":
        from .demo import cli as demo  # deferred: torch, as above
        return demo(argv[1:])
    from .training.entry import cli as run  # deferred: torch, as above
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
