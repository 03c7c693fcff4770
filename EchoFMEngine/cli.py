"""`python -m EchoFMEngine <command> ...`: one entry point, each command lives in its own module.

Commands are imported lazily so that `--help` and light commands start fast.
Each target is a module's ``cli(argv: list[str]) -> int`` (or ``module:function``).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "phantom": ("EchoFMEngine.clinical.phantoms", "write phantom echo studies with known truth"),
    "pretrain": ("EchoFMEngine.training.pretrain", "pretrain EchoFM from a config (same as train.py --config)"),
    "prepare": ("EchoFMEngine.data.prepare", "cut full-cycle clips from a tree of studies into a cache"),
    "bench": ("EchoFMEngine.bench", "speed and memory benchmarks (bench --help lists each with its options)"),
    "info": ("EchoFMEngine.models.checkpoint", "describe a checkpoint file"),
    "finetune": ("EchoFMEngine.training.entry:finetune_cli", "fine-tune a downstream task (same as train.py --config)"),
    "evaluate": ("EchoFMEngine.evaluation.command", "evaluate a fine-tuned checkpoint: metrics.json + figures"),
    "phase": ("EchoFMEngine.analysis.phase_command", "ED/ES of every beat: a phase-strip PNG and a JSON per cine"),
    "analyze": ("EchoFMEngine.analysis", "analyse cine loops: view, ED/ES, masks, volumes, EF, scores"),
    "models": ("EchoFMEngine.models.cli", "the local models folder: list, import a weights file"),
}


def _usage() -> str:
    lines = ["usage: python -m EchoFMEngine COMMAND [options]      (options after the command)", "",
             "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`python -m EchoFMEngine COMMAND --help` describes every option of a command.",
              "Shared options mean the same everywhere: --out (output folder), --device (auto | cpu | cuda),",
              "--models / --folder (models folder, default $ECHOFM_MODELS or ~/.echofm/models).",
              "`python train.py` (no arguments) runs the demo; `python train.py --help` explains configs.", "",
              "example:", "  python -m EchoFMEngine phantom --out phantoms --n 2"]
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
    module_name, _, function = COMMANDS[name][0].partition(":")  # "module" (its cli) or "module:function"
    return int(getattr(importlib.import_module(module_name), function or "cli")(rest) or 0)
