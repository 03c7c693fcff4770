"""`python -m EchoFMEngine evaluate ...`: ``evaluate label-efficiency ...`` runs
:mod:`.label_efficiency`, anything else :mod:`.evaluate`. The dispatch lives here, above both, so
that ``evaluate`` never imports the runner that imports it."""
from __future__ import annotations

from . import evaluate, label_efficiency


def cli(argv: list[str]) -> int:
    """The ``evaluate`` command: the label-efficiency runner or one checkpoint's evaluation."""
    if argv and argv[0] == "label-efficiency":
        return label_efficiency.cli(argv[1:])
    return evaluate.cli(argv)
