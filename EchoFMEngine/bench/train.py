"""`bench train`: full optimiser steps (AdamW, autocast, optional torch.compile) of a preset,
with clips/s, peak memory and - on CUDA - model FLOPs utilisation; optionally how many clips/s a
prepared cache delivers through a DataLoader, to tell whether the loader keeps the GPU fed.
Under torchrun every process runs DDP steps (gloo on CPU, NCCL on CUDA) and prints its own
figures (``rank``), rank 0 also the sum over processes.

    python -m EchoFMEngine bench train --preset vit_l --batch 8 --amp fp32,bf16 --compile
    torchrun --nproc_per_node=2 -m EchoFMEngine bench train --preset tiny --device cpu --steps 3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ..models import build_echofm
from ..runtime import distributed
from ..runtime.distributed import enable_fast_math
from ..training.optim import build_optimizer
from .model import BENCH_CONFIG, _peak_mem_mb, time_steps
from ..data.cache import ClipCache, _random_cache

# Dense tensor-core peaks (FLOP/s) for the MFU denominator: bf16/fp16, and TF32 for fp32 runs.
PEAKS = {"H100": (989.4e12, 494.7e12), "H200": (989.4e12, 494.7e12), "A100": (312e12, 156e12),
         "L40S": (362e12, 183e12), "A10": (125e12, 62.5e12)}
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_flops(device: torch.device, amp: str):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAKS.items():
        if key in name:
            return tf32 if amp == "fp32" else half
    return None


def step_flops(model, video) -> float:
    """FLOPs of one forward + backward, counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = model(video)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def make_train_step(model, optimizer, video, amp_dtype, scaler, compiled):
    autocast = torch.autocast(video.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def step():
        with autocast:
            loss, _ = compiled(video)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def loader_clips_per_s(frames: int, size: int, batch: int, workers: int, n_clips: int, seconds: float,
                       device: torch.device) -> float:
    """Clips/s a memory-mapped cache of random clips delivers (uint8, pinned, copied to ``device``)."""
    with tempfile.TemporaryDirectory() as d:
        _random_cache(Path(d), n_clips, frames, size)
        loader = DataLoader(ClipCache(d, uint8=True), batch_size=batch, shuffle=True, num_workers=workers,
                            pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0)
        seen, t0, first = 0, None, True
        while True:
            for b in loader:
                v = b["video"].to(device, non_blocking=True).float().div_(255)
                if first:  # start timing after the workers are up
                    t0, first = time.perf_counter(), False
                    continue
                seen += v.shape[0]
                if time.perf_counter() - t0 > seconds:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    return seen / (time.perf_counter() - t0)


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m EchoFMEngine bench train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  python -m EchoFMEngine bench train --preset tiny --steps 2")
    ap.add_argument("--preset", default=None, help="tiny | vit_s | vit_b | vit_l (default: the CPU bench config)")
    ap.add_argument("--batch", type=int, default=4, help="clips per step (default 4)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--amp", default="auto", help="comma list of fp32,bf16,fp16 (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--compile", action="store_true", help="also time each amp setting with torch.compile")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2; +3 when compiled)")
    ap.add_argument("--loader-workers", type=int, default=None,
                    help="also measure clips/s from a prepared cache with this many DataLoader workers")
    ap.add_argument("--loader-clips", type=int, default=96, help="clips in the cache the loader reads (default 96)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    a = ap.parse_args(argv)

    info = distributed.setup(a.device)
    try:
        return _bench(a, info)
    finally:
        distributed.cleanup()


def _bench(a, info) -> int:
    """The timed runs of :func:`cli` in one process of ``info.world_size``."""
    device = info.device
    enable_fast_math(device)
    amps = (["bf16"] if device.type == "cuda" else ["fp32"]) if a.amp == "auto" else a.amp.split(",")
    results = []
    flops = None
    for amp in amps:
        for compiled in ([False, True] if a.compile else [False]):
            torch.manual_seed(0)
            model = build_echofm(a.preset or BENCH_CONFIG).to(device).train()
            cfg = model.cfg
            video = torch.rand(a.batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=device)
            if flops is None:
                flops = step_flops(model, video)
            opt = build_optimizer(model, {"base_lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.95)},
                                  a.batch, skip=model.no_weight_decay(), fused=device.type == "cuda")
            scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
            wrapped = model
            if info.enabled:
                wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                              find_unused_parameters=cfg.contrastive == "none")   # the projector idles
            run = torch.compile(wrapped, mode=a.compile_mode) if compiled else wrapped
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            sec = time_steps(make_train_step(model, opt, video, AMP[amp], scaler, run), a.steps,
                             a.warmup + (3 if compiled else 0), device)
            peak = peak_flops(device, amp)
            row = {"rank": info.rank, "world_size": info.world_size, "amp": amp, "compile": a.compile_mode if compiled else False, "step_s": sec, "clips_per_s": a.batch / sec,
                   "peak_mem_gb": _peak_mem_mb(device) / 1024, "tflops_per_s": flops / sec / 1e12,
                   "mfu": flops / sec / peak if peak else None}
            every = distributed.gather_objects(row["clips_per_s"], info)
            if info.enabled:
                row["all_processes_clips_per_s"] = sum(every)
            results.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                  flush=True)
            del model, opt, run, wrapped
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "preset": a.preset or "bench-cpu", "batch": a.batch,
           "step_tflop": flops / 1e12, "runs": results}
    if a.loader_workers is not None:
        cfg = build_echofm(a.preset or BENCH_CONFIG).cfg
        out["loader_clips_per_s"] = loader_clips_per_s(cfg.num_frames, cfg.img_size, a.batch, a.loader_workers,
                                                       a.loader_clips, 10.0, device)
        out["loader_workers"] = a.loader_workers
        best = max(r["clips_per_s"] for r in results)
        out["loader_keeps_up"] = out["loader_clips_per_s"] >= best
        print(f"loader: {out['loader_clips_per_s']:.1f} clips/s with {a.loader_workers} workers "
              f"(fastest training run needs {best:.1f})")
    out.update(rank=info.rank, world_size=info.world_size)
    if a.json and info.is_main:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0
