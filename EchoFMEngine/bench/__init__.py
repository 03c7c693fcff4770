"""`python -m EchoFMEngine bench <what> ...`: speed and memory measurements (never timed tests)."""
from __future__ import annotations

import contextlib
import importlib
from io import StringIO as _StringIO  # (the name io is the io bench submodule here)
import sys

# name -> (module with cli(argv), one-line description). Register a new bench with one line here.
BENCHES = {
    "model": ("EchoFMEngine.bench.model", "time of one pretraining step (forward+backward), clips/s, memory"),
    "io": ("EchoFMEngine.bench.io", "decoded frames per second of the cine readers (AVI, MP4, DICOM)"),
    "train": ("EchoFMEngine.bench.train", "full optimiser steps per amp/compile setting, loader throughput"),
    "analyze": ("EchoFMEngine.bench.analyze", "seconds and peak memory per study of the analysis pipeline"),
    "phase": ("EchoFMEngine.bench.phase", "seconds per cine of ED/ES detection from the images"),
    "propagate": ("EchoFMEngine.bench.propagate", "seconds and peak memory of mask propagation from one ED mask"),
}
EXAMPLE = "python -m EchoFMEngine bench io --quick"


def _entry(name: str) -> tuple[str, str]:
    """(module, description) of a bench; a bare module string is accepted too."""
    value = BENCHES[name]
    return (value, "") if isinstance(value, str) else (value[0], value[1])


def bench_help(name: str) -> str:
    """The ``--help`` text of one bench, captured from its own parser."""
    buf = _StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            importlib.import_module(_entry(name)[0]).cli(["--help"])
        except SystemExit:
            pass
    return buf.getvalue()


def _options_of(help_text: str) -> str:
    """The options section of an argparse help text (without -h), indented for the overview."""
    lines, keep = [], False
    for line in help_text.splitlines():
        if line.rstrip().endswith(":") and not line.startswith(" "):
            keep = line.startswith(("options", "optional arguments", "positional arguments"))
            continue
        if keep and line.strip() and not line.strip().startswith("-h, --help"):
            lines.append("    " + line)
    return "\n".join(lines)


def usage(full: bool = True) -> str:
    """``bench --help``: every bench with its description and (``full``) every option it takes."""
    out = ["usage: python -m EchoFMEngine bench {" + ",".join(BENCHES) + "} [options]", "",
           "Speed and memory measurements; each prints a table and can write JSON. "
           "`bench NAME --help` shows one bench.", "", "benches:"]
    for name in BENCHES:
        out.append(f"  {name:<9} {_entry(name)[1]}")
        if full:
            opts = _options_of(bench_help(name))
            out += [opts, ""] if opts else [""]
    out += ["", "example:", f"  {EXAMPLE}"]
    return "\n".join(out)


def cli(argv) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(full=True))
        return 0
    if argv[0] not in BENCHES:
        print(f"error: unknown bench {argv[0]!r}; choose from {', '.join(BENCHES)}\n\n{usage(full=False)}",
              file=sys.stderr)
        return 2
    return int(importlib.import_module(_entry(argv[0])[0]).cli(argv[1:]) or 0)
