"""`python -m EchoFMEngine bench <what> ...`: speed and memory measurements (never timed tests)."""
from __future__ import annotations

import importlib
import sys

BENCHES = {
    "model": "EchoFMEngine.bench.model",
    "io": "EchoFMEngine.bench.io",
    "train": "EchoFMEngine.bench.train",
    "analyze": "EchoFMEngine.bench.analyze",
}


def cli(argv) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print("usage: python -m EchoFMEngine bench {" + ",".join(BENCHES) + "} [options]",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(BENCHES[argv[0]]).cli(argv[1:]) or 0)
