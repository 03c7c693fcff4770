"""EchoFM pretraining loop: one process or many (torchrun, DDP), CPU or CUDA, exactly resumable.

    python train.py --config Resources/configs/demo.yaml run.steps=200
    torchrun --nproc_per_node=8 train.py --config Resources/configs/pretrain_vitl_paper.yaml
    python -m EchoFMEngine pretrain --config ... --resume
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..models import EchoFM, build_echofm, save_pretrained
from ..models.checkpoint import CheckpointError, init_from_checkpoint
from ..runtime import distributed
from . import checkpointing
from ..atomic import LockedError
from .config import ConfigError, dump_config, load_config
from .data import Indexed, PhantomClips, StepBatchSampler, item_seed
from .optim import build_optimizer, build_scheduler


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the run stops and keeps its last good checkpoint."""


def build_model(cfg: dict) -> EchoFM:
    """The model from ``cfg['model']``, initialised from ``cfg['init_from']`` when given
    (our format, a released EchoFM file or a VideoMAE-style checkpoint)."""
    model = build_echofm(dict(cfg["model"]))
    if cfg.get("init_from"):
        report = init_from_checkpoint(model, cfg["init_from"])
        loaded = len(model.state_dict()) - len(report["missing"])
        print(f"initialised {loaded} tensors from {cfg['init_from']}; " + "; ".join(report["notes"]))
    return model


def build_dataset(cfg: dict, model_cfg) -> torch.utils.data.Dataset:
    """Pretraining clips sized for the model; fails before any training when there are none."""
    d = cfg["data"]
    kind = d["kind"]
    if kind == "phantom":
        ds = PhantomClips(d["n_studies"], model_cfg.num_frames, model_cfg.img_size, seed=d["seed"])
    elif kind == "cache":
        from ..data.cache import ClipCache
        ds = Indexed(ClipCache(d["root"], uint8=True))     # uint8 to the device, scaled there
    elif kind == "folder":
        from ..data import build_dataset as build_named
        ds = Indexed(build_named("folder", d["root"], frames=model_cfg.num_frames, size=model_cfg.img_size))
    else:
        raise ValueError(f"data.kind must be phantom, cache or folder, got {kind!r}")
    if len(ds) == 0:
        raise ValueError(f"no readable clips in {d.get('root') or kind!r}")
    if kind == "cache" and (ds.dataset.frames, ds.dataset.size) != (model_cfg.num_frames, model_cfg.img_size):
        raise ValueError(f"{d['root']}: cache clips are {ds.dataset.frames} frames x {ds.dataset.size} px, the model "
                         f"takes {model_cfg.num_frames} x {model_cfg.img_size}")
    return ds


def _amp(name: str, device: torch.device) -> Optional[torch.dtype]:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class RunLog:
    """CSV log of every logged step, plus TensorBoard when it is installed (main process only)."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.path = out / "log.csv"
        self.enabled = enabled
        self.writer, self.tb = None, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
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
        rows = list(csv.DictReader(open(self.path)))
        keep = [r for r in rows if int(r["step"]) <= step]
        if len(keep) != len(rows):
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(keep)


def pretrain(cfg: dict, resume: bool = False, progress: bool = True) -> dict:
    """Run (or continue) pretraining as ``cfg`` says; returns a summary (also ``summary.json``)."""
    run = cfg["run"]
    info = distributed.setup(run["device"])
    lock = None
    try:
        lock = checkpointing.run_lock(run["out"], "pretraining") if info.is_main else None
        return _pretrain(cfg, info, resume, progress)
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()


def _pretrain(cfg: dict, info, resume: bool, progress: bool) -> dict:
    run, ocfg = cfg["run"], cfg["optim"]
    out = Path(run["out"])
    device = info.device
    torch.manual_seed(run["seed"] + info.rank)
    distributed.enable_fast_math(device)

    model = build_model(cfg).to(device)
    mcfg = model.cfg
    dataset = build_dataset(cfg, mcfg)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")

    accum, steps = int(ocfg["accum_steps"]), int(run["steps"])
    global_batch = run["batch_size"] * accum * info.world_size
    optimizer = build_optimizer(model, ocfg, global_batch, skip=model.no_weight_decay(),
                                fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, steps, ocfg)
    amp = _amp(run["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    start = 0
    if resume:
        state = checkpointing.load_latest(out, map_location="cpu")
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            distributed.restore_rng_state(state["rng"], info)
            start = int(state["step"])
            if info.is_main:
                print(f"resuming from {state['path']} at step {start}")
    log = RunLog(out, info.is_main, run["tensorboard"])
    log.truncate_after(start)

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              find_unused_parameters=mcfg.contrastive == "none") if info.enabled else model
    train_model = torch.compile(ddp, mode=run["compile_mode"]) if run["compile"] else ddp
    sampler = StepBatchSampler(len(dataset), run["batch_size"], info.rank, info.world_size, run["seed"],
                               start_micro_step=start * accum)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg["data"]["num_workers"],
                        pin_memory=device.type == "cuda", persistent_workers=cfg["data"]["num_workers"] > 0)
    batches = iter(loader)
    autocast = (torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext())

    def save(step: int):
        rngs = distributed.gather_rng_states(info)
        if info.is_main:
            checkpointing.save_checkpoint(out, step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "rng": rngs, "config": json.dumps(cfg), "global_batch": global_batch,
            }, keep_last=run["keep_last"])
        distributed.barrier(info)

    bar = None
    if progress and info.is_main:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start, desc="pretrain", dynamic_ncols=True, file=sys.stderr)
    model.train()
    history, t_start, clips_seen = [], time.perf_counter(), 0
    pending: list = []            # (step, loss) not yet checked: checking every step would stall the GPU

    def check_finite():
        """Stop on the first non-finite loss since the last check (one host sync per check)."""
        if not pending:
            return
        losses = torch.stack([v for _, v in pending])
        if not bool(torch.isfinite(losses).all()):
            bad = pending[int((~torch.isfinite(losses)).nonzero()[0])][0]
            last = checkpointing.list_checkpoints(out)
            raise NonFiniteLoss(
                f"non-finite loss at step {bad}; stopping. Last good checkpoint: "
                f"{last[-1] if last else 'none'} (lower optim.base_lr or use run.amp=bf16/fp32)")
        pending.clear()

    t_log, last_logged = time.perf_counter(), start
    for step in range(start, steps):
        sums: dict = {}
        for micro in range(accum):
            g = step * accum + micro
            batch = next(batches)
            video = batch["video"].to(device, non_blocking=True)
            if video.dtype == torch.uint8:
                video = video.float().div_(255.0)
            gens = [torch.Generator().manual_seed(item_seed(run["seed"], g, int(i))) for i in batch["index"]]
            sync = ddp.no_sync() if info.enabled and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast:
                    loss, parts = train_model(video, generator=gens)
                scaler.scale(loss / accum).backward()
            pending.append((step + 1, loss.detach()))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
        scaler.unscale_(optimizer)
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg["clip_grad"])
                     if ocfg["clip_grad"] else torch.zeros(()))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step_update(step + 1)
        clips_seen += global_batch
        if (step + 1) % run["log_every"] == 0 or step + 1 == steps:
            check_finite()
            dt = (time.perf_counter() - t_log) / (step + 1 - last_logged)   # mean step time since last log
            t_log, last_logged = time.perf_counter(), step + 1
            logged = {k: float(distributed.all_reduce_mean(v, info)) for k, v in sums.items()}
            row = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"], **logged,
                   "grad_norm": float(grad_norm), "clips_per_s": global_batch / dt, "step_s": dt}
            log.write(row)
            history.append(row)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "recon", "contrastive",
                                                                                "clips_per_s")})
        if bar is not None:
            bar.update(1)
        if (step + 1) % run["ckpt_every"] == 0 and step + 1 < steps:
            check_finite()            # never checkpoint weights that saw a non-finite loss
            save(step + 1)
    check_finite()
    if bar is not None:
        bar.close()
    if start < steps or not checkpointing.list_checkpoints(out):
        save(steps)
    elapsed = time.perf_counter() - t_start
    summary = {"rank": info.rank, "steps": steps, "resumed_from": start, "global_batch": global_batch,
               "world_size": info.world_size, "device": str(device), "amp": str(amp),
               "seconds": elapsed, "clips_per_s": clips_seen / elapsed if elapsed else None,
               "final": history[-1] if history else None}
    if info.is_main:
        save_pretrained(model, out / "model", metadata={"task": "pretrain", "steps": steps})
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m EchoFMEngine pretrain", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain EchoFM (masked video reconstruction + contrastive loss) from a config; writes "
                    "run.out/ (checkpoints, log.csv, model/, summary.json). Same as python train.py --config.",
        epilog="example:\n  python -m EchoFMEngine pretrain --config Resources/configs/demo.yaml "
               "run.steps=5 run.out=runs/quick")
    ap.add_argument("--config", default=None,
                    help="YAML config (Resources/configs/demo.yaml, pretrain_*.yaml); default: built-in defaults")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.out")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.steps=200 optim.base_lr=1.5e-4")
    return ap.parse_intermixed_args(argv)   # overrides before or after the flags


def cli(argv) -> int:
    a = parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        summary = pretrain(cfg, resume=a.resume, progress=not a.no_progress)
    except (ConfigError, LockedError) as e:     # exit 2: usage/config error, nothing ran
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, FileNotFoundError, CheckpointError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.get("final") and summary["rank"] == 0:
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v)
                          for k, v in summary["final"].items()}))
    return 0  # a non-finite loss has already raised NonFiniteLoss (exit 1 above)
