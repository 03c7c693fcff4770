"""Plumbing shared by the pretraining and the fine-tuning loop, written once: the process group
and run-folder lock, mixed precision, the run log, the non-finite loss guard, one optimiser update,
checkpoint save / exact resume, the progress bar, and the command line (parser and exit codes)."""
from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..atomic import LockedError
from ..models.checkpoint import CheckpointError
from ..runtime import distributed
from . import checkpointing
from .config import ConfigError, load_config


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the run stops and keeps its last good checkpoint."""


# ------------------------------------------------------------------ process group + lock
@contextlib.contextmanager
def training_run(device: str, out, what: str) -> Iterator[distributed.DistInfo]:
    """The process group torchrun describes (one process when not launched by it), rank 0 holding
    the lock of the run folder ``out``; a refused lock stops every rank with :class:`LockedError`."""
    info = distributed.setup(device)
    lock = None
    try:
        refused = None
        if info.is_main:
            try:
                lock = checkpointing.run_lock(out, what)
            except LockedError as e:
                refused = str(e)
        refused = distributed.broadcast_object(refused, info)
        if refused is not None:
            raise LockedError(refused)
        yield info
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()


# ------------------------------------------------------------------ mixed precision
def amp_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """``run.amp`` as a dtype: auto = bf16 on CUDA, fp32 (None) on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass
class Precision:
    """The autocast context (reusable), its dtype and the gradient scaler (active for fp16 only)."""

    dtype: Optional[torch.dtype]
    autocast: object
    scaler: torch.amp.GradScaler


def precision(name: str, device: torch.device) -> Precision:
    dtype = amp_dtype(name, device)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    return Precision(dtype, ctx, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def apply_update(precision_: Precision, optimizer, params, clip_grad) -> torch.Tensor:
    """Unscale, clip the gradient norm (``clip_grad`` falsy: no clipping), step, zero the gradients;
    returns the gradient norm before clipping (0 when not clipped)."""
    scaler = precision_.scaler
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, float(clip_grad)) if clip_grad else torch.zeros(())
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


# ------------------------------------------------------------------ log + loss guard
class RunLog:
    """CSV log of every logged step, plus TensorBoard when it is installed (main process only;
    ``out`` None: nothing is written)."""

    def __init__(self, out: Optional[Path], enabled: bool, tensorboard: bool):
        self.enabled = enabled and out is not None
        self.path = Path(out) / "log.csv" if out is not None else None
        self.tb = None
        if self.enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # deferred: optional, tensorboard may be absent
                self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
            except ImportError:
                pass

    def write(self, row: dict):
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tb:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def truncate_after(self, step: int):
        """Drop rows beyond ``step`` (written by a run that was killed after its last checkpoint)."""
        if not (self.enabled and self.path.exists()):
            return
        with open(self.path) as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["step"]) <= step]
        if len(keep) != len(rows):
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(keep)


class LossGuard:
    """Losses not yet checked, as (step, tensor): one host sync per check instead of one per step.
    :meth:`check` stops every rank at the first non-finite one, naming the last good checkpoint."""

    def __init__(self, out: Optional[Path], info: distributed.DistInfo, hint: str):
        self.out, self.info, self.hint = out, info, hint
        self.pending: list = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss.detach()))

    def check(self) -> None:
        ok, i = distributed.all_finite([v for _, v in self.pending], self.info)
        if not ok:
            last = checkpointing.list_checkpoints(self.out) if self.out is not None else []
            raise NonFiniteLoss(f"non-finite loss at step {self.pending[i][0]}; stopping. Last good checkpoint: "
                                f"{last[-1] if last else 'none'} ({self.hint})")
        self.pending.clear()


# ------------------------------------------------------------------ checkpoints
def save_state(out: Path, step: int, info: distributed.DistInfo, state: dict, keep_last: int) -> None:
    """Checkpoint ``state`` plus every rank's RNG states at ``step`` (rank 0 writes; all ranks wait)."""
    rngs = distributed.gather_rng_states(info)
    if info.is_main:
        checkpointing.save_checkpoint(out, step, {**state, "step": step, "rng": rngs}, keep_last=keep_last)
    distributed.barrier(info)


def resume_state(out: Path, info: distributed.DistInfo, modules: dict, announce: bool = True) -> Optional[dict]:
    """Load the newest checkpoint of ``out`` into ``modules`` (name -> object with
    ``load_state_dict``: model, optimizer, scheduler, scaler) and restore this rank's RNG states;
    returns the checkpoint (with ``path``) or None when there is none."""
    state = checkpointing.load_latest(out, map_location="cpu")
    if state is None:
        return None
    for name, module in modules.items():
        module.load_state_dict(state[name])
    distributed.restore_rng_state(state["rng"], info)
    if announce and info.is_main:
        print(f"resuming from {state['path']} at step {int(state['step'])}")
    return state


def progress_bar(show: bool, total: int, initial: int, desc: str):
    """A tqdm bar on stderr, or None when ``show`` is False or nothing is left to do."""
    if not show or initial >= total:
        return None
    from tqdm import tqdm          # deferred on purpose: only progress bars need it

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)


# ------------------------------------------------------------------ command line
def run_parser(prog: str, description: str, epilog: str, config_help: str, overrides_help: str,
               progress_help: str = "no progress bar (it goes to stderr)",
               usage: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser every training command shares (train.py, pretrain, finetune): --config, --resume,
    --no-progress and key=value overrides."""
    ap = argparse.ArgumentParser(prog=prog, usage=usage, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description=description, epilog=epilog)
    ap.add_argument("--config", default=None, metavar="FILE", help=config_help)
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.out")
    ap.add_argument("--no-progress", action="store_true", help=progress_help)
    ap.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    return ap


def run_cli(args: argparse.Namespace, run: Callable[..., dict], report: Callable[[dict, dict], None]) -> int:
    """Load the config of ``args``, ``run(cfg, resume=, progress=)``, then ``report(cfg, result)``.
    Exit status: 0 done, 2 bad config or a run folder in use (nothing ran), 1 a run error."""
    try:
        cfg = load_config(args.config, args.overrides)
        result = run(cfg, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, LockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, FileNotFoundError, CheckpointError, NonFiniteLoss) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 1
    report(cfg, result)
    return 0


