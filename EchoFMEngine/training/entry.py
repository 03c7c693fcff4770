"""Dispatch a training config to its loop by its ``task`` key: pretraining or a fine-tuning task.

Also the ``--help`` of ``python train.py``: what a bare run does (the demo), which configs exist,
how overrides and resuming work."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..configs import CONFIG_DIR
from .config import FINETUNE_TASKS, ConfigError, read_yaml
from .loop import run_parser

LOOPS = {"pretrain": "EchoFMEngine.training.pretrain",
         **{task: "EchoFMEngine.training.finetune" for task in FINETUNE_TASKS}}
CONFIGS = CONFIG_DIR                   # the shipped configs (package data; Resources/configs links here)

TRAIN_DESCRIPTION = """\
EchoFM training entry point (plain Python, torchrun, or headless 3D Slicer).

  python train.py                 the demo: phantom studies -> pretrain a tiny EchoFM -> fine-tune a
                                  segmentation head -> analyse a held-out phantom DICOM; writes runs/demo/
                                  (a few minutes on a 2-core CPU; `python train.py demo --help` for its options)
  python train.py --config FILE   run one config: its `task:` key picks the loop, pretraining (task: pretrain)
                                  or fine-tuning (task: view | segment | as | ar | ef); FILE is a path or
                                  the name of a shipped config below (--config finetune_view)

A config is a YAML file; key=value arguments override any of its keys (run.steps=50 head.mode=frozen;
an unknown key is refused with the closest known one). `--config FILE --help` shows that loop's options.
Exit status: 0 success, 1 run error, 2 bad config or arguments, 3 missing packages."""


def _config_list() -> str:
    """One line per shipped config: its name (what --config accepts), its file in a checkout, its task."""
    rows = []
    for f in sorted(CONFIGS.glob("*.yaml")):
        try:
            task = read_yaml(f).get("task", "pretrain")
        except (OSError, ConfigError):
            task = "?"
        rows.append(f"  {f.stem:<24} {'Resources/configs/' + f.name:<48} task: {task}")
    return "\n".join(rows)


def train_parser() -> argparse.ArgumentParser:
    """The parser behind `python train.py --help` (dispatch itself reads only --config)."""
    return run_parser(
        "python train.py", TRAIN_DESCRIPTION,
        "configs:\n" + _config_list() + "\n\nexamples:\n"
               "  python train.py --config Resources/configs/demo.yaml run.steps=5 run.out=runs/quick\n"
               "  python train.py --config finetune_view run.steps=5 run.out=runs/view\n"
               "  torchrun --nproc_per_node=8 train.py --config Resources/configs/pretrain_vitl_paper.yaml "
               "data.root=CACHE\n"
               "  Slicer --no-main-window --python-script train.py --config Resources/configs/demo.yaml",
        "YAML config; its task: key chooses pretraining or fine-tuning", "config overrides, e.g. run.steps=50",
        progress_help="no progress bars (they go to stderr)",
        usage="python train.py [demo [DEMO OPTIONS] | --config FILE [--resume] [--no-progress] [key=value ...]]")


def cli(argv: list[str]) -> int:
    """`train.py --config X.yaml ...`: read the task from the config (default pretrain) and run it."""
    argv = list(argv)
    if "--config" not in argv and ("-h" in argv or "--help" in argv):
        train_parser().print_help()
        return 0
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
    return importlib.import_module(LOOPS[task]).cli(argv)


def finetune_cli(argv: list[str]) -> int:
    """`python -m EchoFMEngine finetune`: train.py's dispatch limited to fine-tuning configs
    (its --help is the fine-tuning one; a pretraining config is sent to `pretrain`)."""
    argv = list(argv)
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        try:
            task = read_yaml(argv[argv.index("--config") + 1]).get("task", "pretrain")
        except (OSError, ConfigError):
            task = None                  # cli() reports the unreadable file
        if task == "pretrain":
            print(f"error: {argv[argv.index('--config') + 1]} is a pretraining config (task: pretrain); run it "
                  f"with `python -m EchoFMEngine pretrain --config ...` or `python train.py --config ...`",
                  file=sys.stderr)
            return 2
    elif "--config" not in argv:
        # deferred: finetune loads the model stack; other tasks dispatch by name through LOOPS
        from .finetune import cli as finetune
        return finetune(argv)            # --help, or the view task on phantoms by default
    return cli(argv)
