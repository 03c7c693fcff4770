"""Dispatch a training config to its loop by its ``task`` key: pretraining or a fine-tuning task."""
from __future__ import annotations

import sys

import yaml

from .config import FINETUNE_TASKS

LOOPS = {"pretrain": "EchoFMEngine.training.pretrain",
         **{task: "EchoFMEngine.training.finetune" for task in FINETUNE_TASKS}}


def cli(argv: list[str]) -> int:
    """`train.py --config X.yaml ...`: read the task from the config (default pretrain) and run it."""
    task = "pretrain"
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            print("error: --config needs a file", file=sys.stderr)
            return 1
        try:
            with open(argv[i + 1]) as f:
                task = (yaml.safe_load(f) or {}).get("task", "pretrain")
        except OSError as e:
            print(f"error: cannot read config {argv[i + 1]}: {e}", file=sys.stderr)
            return 1
    if task not in LOOPS:
        print(f"error: task {task!r} has no training loop; known: {sorted(LOOPS)}", file=sys.stderr)
        return 1
    import importlib
    return importlib.import_module(LOOPS[task]).cli(argv)
