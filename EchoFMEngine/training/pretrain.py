"""EchoFM pretraining loop: one process or many (torchrun, DDP), CPU or CUDA, exactly resumable.

    python train.py --config Resources/configs/demo.yaml run.steps=200
    torchrun --nproc_per_node=8 train.py --config Resources/configs/pretrain_vitl_paper.yaml
    python -m EchoFMEngine pretrain --config ... --resume
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..data import build_dataset as build_named
from ..data import dataset_names
from ..data.datasets import dataset_layout, dataset_tasks
from ..data.cache import ClipCache
from ..models import EchoFM, build_echofm, save_pretrained
from ..models.checkpoint import init_from_checkpoint
from ..runtime import distributed
from . import checkpointing
from .config import dump_config
from .data import Indexed, StepBatchSampler, item_seed
from .loop import (LossGuard, NonFiniteLoss, RunLog, apply_update, precision, progress_bar,  # noqa: F401
                   resume_state, run_cli, run_parser, save_state, training_run)
from .optim import build_optimizer, build_scheduler


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
    kinds = [n for n in dataset_names() if "pretrain" in dataset_tasks(n)]
    if kind not in kinds:
        raise ValueError(f"data.kind must be one of {kinds} for pretraining, got {kind!r}")
    layout = dataset_layout(kind)
    if layout.needs_root and not d.get("root"):
        raise ValueError(f"data.root is required for data.kind {kind!r}")
    if kind == "cache":
        ds = Indexed(ClipCache(d["root"], uint8=True))     # uint8 to the device, scaled there
    else:
        ds = Indexed(build_named(kind, d.get("root"), frames=model_cfg.num_frames, size=model_cfg.img_size,
                                 **layout.config_options("pretrain", d, "train")))
    if len(ds) == 0:
        raise ValueError(f"no readable clips in {d.get('root') or kind!r}")
    if kind == "cache" and (ds.dataset.frames, ds.dataset.size) != (model_cfg.num_frames, model_cfg.img_size):
        raise ValueError(f"{d['root']}: cache clips are {ds.dataset.frames} frames x {ds.dataset.size} px, the model "
                         f"takes {model_cfg.num_frames} x {model_cfg.img_size}")
    return ds


def pretrain(cfg: dict, resume: bool = False, progress: bool = True) -> dict:
    """Run (or continue) pretraining as ``cfg`` says; returns a summary (also ``summary.json``)."""
    with training_run(cfg["run"]["device"], cfg["run"]["out"], "pretraining") as info:
        return _pretrain(cfg, info, resume, progress)


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
    prec = precision(run["amp"], device)
    modules = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": prec.scaler}
    state = resume_state(out, info, modules) if resume else None
    start = int(state["step"]) if state is not None else 0
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

    def save(step: int):
        save_state(out, step, info, {**{k: m.state_dict() for k, m in modules.items()}, "config": json.dumps(cfg),
                                     "global_batch": global_batch}, keep_last=run["keep_last"])

    bar = progress_bar(progress and info.is_main, steps, start, "pretrain")
    model.train()
    history, t_start, clips_seen = [], time.perf_counter(), 0
    guard = LossGuard(out, info, "lower optim.base_lr or use run.amp=bf16/fp32")
    check_finite = guard.check

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
                with prec.autocast:
                    loss, parts = train_model(video, generator=gens)
                prec.scaler.scale(loss / accum).backward()
            guard.add(step + 1, loss)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
        grad_norm = apply_update(prec, optimizer, model.parameters(), ocfg["clip_grad"])
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
               "world_size": info.world_size, "device": str(device), "amp": str(prec.dtype),
               "seconds": elapsed, "clips_per_s": clips_seen / elapsed if elapsed else None,
               "final": history[-1] if history else None}
    if info.is_main:
        save_pretrained(model, out / "model", metadata={"task": "pretrain", "steps": steps})
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def parse_args(argv):
    ap = run_parser(
        "python -m EchoFMEngine pretrain",
        "Pretrain EchoFM (masked video reconstruction + contrastive loss) from a config; writes run.out/ "
        "(checkpoints, log.csv, model/, summary.json). Same as python train.py --config.",
        "example:\n  python -m EchoFMEngine pretrain --config Resources/configs/demo.yaml run.steps=5 run.out=runs/quick",
        "YAML config (Resources/configs/demo.yaml, pretrain_*.yaml); default: built-in defaults",
        "key=value overrides, e.g. run.steps=200 optim.base_lr=1.5e-4")
    return ap.parse_intermixed_args(argv)   # overrides before or after the flags


def _report(cfg: dict, summary: dict) -> None:
    if summary.get("final") and summary["rank"] == 0:
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in summary["final"].items()}))


def cli(argv) -> int:
    """`python -m EchoFMEngine pretrain`: exit 0 done, 1 run error (a non-finite loss too), 2 bad config."""
    return run_cli(parse_args(argv), pretrain, _report)
