"""Training checkpoints: written atomically, the last K kept, everything needed for an exact resume."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch

from ..atomic import RunLock

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    """Checkpoints of a run folder, oldest first."""
    d = checkpoint_dir(out)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def save_checkpoint(out: Path, step: int, state: dict, keep_last: int = 3) -> Path:
    """Write ``state`` as ``checkpoints/step_XXXXXXXX.pt`` via a temporary file and rename,
    then delete all but the newest ``keep_last``."""
    d = checkpoint_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:08d}.pt"
    tmp = d / f".{final.name}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return final


def run_lock(out, what: str):
    """Own the run folder ``out`` (a second training into it is refused, naming the first) and
    remove temporary checkpoint files a killed writer left (they can only be stale while we hold it)."""
    lock = RunLock(out, what).acquire()
    d = checkpoint_dir(out)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".step_") and ".pt.tmp" in p.name:
                p.unlink(missing_ok=True)
    return lock


def load_latest(out: Path, map_location="cpu") -> Optional[dict]:
    """The newest readable checkpoint of a run folder (a torn file is skipped), or None."""
    for path in reversed(list_checkpoints(out)):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file must not stop the resume
            print(f"warning: skipping unreadable checkpoint {path}: {e}")
            continue
        state["path"] = str(path)
        return state
    return None
