"""Checkpoint errors and the weights-file lookup, with the standard library only: the models folder
(registry.py) and the Slicer library use them without loading torch."""
from __future__ import annotations

from pathlib import Path
from typing import Union


class CheckpointError(ValueError):
    """A checkpoint file that cannot become an EchoFM; the message names the file and the key."""


def weights_file(path: Union[str, Path]) -> Path:
    """The ``.safetensors`` file itself, or ``model.safetensors`` inside a checkpoint folder."""
    p = Path(path)
    file = p / "model.safetensors" if p.is_dir() else p
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file (no weights file: expected a .safetensors file or a "
                              "folder holding model.safetensors)")
    return file
