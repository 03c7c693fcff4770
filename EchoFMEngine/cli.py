"""`python -m EchoFMEngine <command> ...`: one entry point, each command lives in its own module.

Commands are imported lazily so that `--help` and light commands start fast.
Each target is a function ``cli(argv: list[str]) -> int``.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "phantom": ("EchoFMEngine.synthetic", "write phantom echo studies with known truth"),
    "pretrain": ("EchoFMEngine.training.pretrain", "pretrain EchoFM (same as train.py)"),
    "prepare": ("EchoFMEngine.data.prepare", "cut full-cycle clips from a tree of studies into a cache"),
    "bench": ("EchoFMEngine.bench", "benchmarks: model, io, train, analyze"),
    "info": ("EchoFMEngine.models.checkpoint", "describe a checkpoint file"),
    "finetune": ("EchoFMEngine.training.entry", "fine-tune a downstream task (same as train.py --config)"),
    "evaluate": ("EchoFMEngine.evaluation.evaluate", "evaluate a fine-tuned checkpoint: metrics.json + figures"),
    "analyze": ("EchoFMEngine.analysis", "analyse cine loops: view, ED/ES, masks, volumes, EF, scores"),
    "models": ("EchoFMEngine.models.registry", "the local models folder: list, import a weights file"),
}


def _usage() -> str:
    lines = ["usage: python -m EchoFMEngine <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.cli(rest) or 0)
