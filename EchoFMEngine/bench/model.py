"""`bench model`: forward+backward time of one pretraining step, clips/s, tokens/s, peak memory.

The default configuration is the CPU target of the foundation issue: 32 frames of 112x112,
width 384, depth 6, 6 heads, decoder 192x2, batch 4, pixel-prior loss. ``--compare-reference``
times the naive released-layout model (fp32, separate q/k/v, hand-written attention, a projector
call per frame) in the same run and prints the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time

import torch

from ..models import build_echofm
from ..runtime.distributed import enable_fast_math, resolve_device
from .reference import ReferenceEchoFM

BENCH_CONFIG = dict(img_size=112, num_frames=32, tubelet=4, patch_size=16, embed_dim=384, depth=6,
                    num_heads=6, decoder_embed_dim=192, decoder_depth=2, decoder_num_heads=6,
                    contrastive="pixel")


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call of ``step()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def time_interleaved(steps_by_name: dict, steps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per call of each step function, calls alternating between them so that
    both see the same machine state (frequency, other load) - a fair ratio on a shared CPU."""
    for _ in range(warmup):
        for step in steps_by_name.values():
            step()
    times = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def make_step(model, video, amp_dtype, mask_ratio):
    """A closure running forward + backward (+ zeroing grads) once."""
    autocast = (torch.autocast(video.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())

    def step():
        with autocast:
            out = model(video, mask_ratio)
        loss = out[0]
        loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m EchoFMEngine bench model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  python -m EchoFMEngine bench model --preset tiny --steps 2")
    ap.add_argument("--preset", default=None, help="tiny | vit_s | vit_b | vit_l (default: the CPU target config)")
    ap.add_argument("--frames", type=int, default=None, help="frames per clip (default: the preset's)")
    ap.add_argument("--size", type=int, default=None, help="square image size in pixels (default: the preset's)")
    ap.add_argument("--batch", type=int, default=4, help="clips per step (default 4)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                    help="autocast dtype (auto: bf16 on CUDA, none on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--contrastive", default=None, choices=["triplet", "pixel", "none"],
                    help="contrastive loss next to reconstruction (default: the preset's)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--mask-ratio", type=float, default=0.75, help="share of tubelets masked (default 0.75)")
    ap.add_argument("--compare-reference", action="store_true",
                    help="also time the naive released-layout model and print the ratio")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    a = ap.parse_args(argv)

    device = resolve_device(a.device)
    enable_fast_math(device)
    amp = {"auto": torch.bfloat16 if device.type == "cuda" else None, "none": None,
           "bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]
    overrides = {k: v for k, v in (("num_frames", a.frames), ("img_size", a.size),
                                   ("contrastive", a.contrastive)) if v is not None}
    model = build_echofm(a.preset or BENCH_CONFIG, **overrides).to(device).train()
    cfg = model.cfg
    video = torch.rand(a.batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=device)
    run = torch.compile(model) if a.compile else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours = make_step(run, video, amp, a.mask_ratio)
    if a.compare_reference:
        ref = ReferenceEchoFM(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                              depth=cfg.depth, num_heads=cfg.num_heads, decoder_embed_dim=cfg.decoder_embed_dim,
                              decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads,
                              num_frames=cfg.num_frames, t_patch_size=cfg.tubelet).to(device).train()
        medians = time_interleaved({"ours": ours, "reference": make_step(ref, video, None, a.mask_ratio)},
                                   a.steps, a.warmup, device)
        sec, ref_sec = medians["ours"], medians["reference"]
    else:
        sec = time_steps(ours, a.steps, a.warmup, device)
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "amp": str(amp), "compile": a.compile,
        "config": {k: getattr(cfg, k) for k in ("img_size", "num_frames", "tubelet", "patch_size", "embed_dim",
                                                "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
                                                "contrastive")},
        "batch": a.batch, "step_s": sec, "clips_per_s": a.batch / sec,
        "tokens_per_s": a.batch * cfg.num_tokens / sec, "peak_mem_mb": _peak_mem_mb(device),
    }
    if a.compare_reference:
        result.update(reference_step_s=ref_sec, ratio_vs_reference=sec / ref_sec)
    for k, v in result.items():
        print(f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
