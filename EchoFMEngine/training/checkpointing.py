"""Training checkpoints: written atomically, the last K kept, everything needed for an exact resume."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as plain types (bytes, ints, lists), so
    they survive ``all_gather_object`` and a ``weights_only`` load."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _bytes_state(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(_bytes_state(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_state(b) for b in state["cuda"]])


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
    from ..atomic import RunLock

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
