"""Dispatch a training config to its loop by its ``task`` key: pretraining or a fine-tuning task."""
from __future__ import annotations

import sys

from .config import FINETUNE_TASKS, ConfigError, read_yaml

LOOPS = {"pretrain": "EchoFMEngine.training.pretrain",
         **{task: "EchoFMEngine.training.finetune" for task in FINETUNE_TASKS}}


def cli(argv: list[str]) -> int:
    """`train.py --config X.yaml ...`: read the task from the config (default pretrain) and run it."""
    task = "pretrain"
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            print("error: --config needs a file", file=sys.stderr)
            return 2
        try:
            task = read_yaml(argv[i + 1]).get("task", "pretrain")
        except OSError as e:
            print(f"error: cannot read config {argv[i + 1]}: {e}", file=sys.stderr)
            return 2
        except ConfigError as e:         # YAML syntax error or a file that is not a mapping
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not isinstance(task, str) or task not in LOOPS:
        print(f"error: task {task!r} has no training loop; known: {sorted(LOOPS)}", file=sys.stderr)
        return 2
    import importlib
    return importlib.import_module(LOOPS[task]).cli(argv)
