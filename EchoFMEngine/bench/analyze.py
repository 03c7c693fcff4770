"""`bench analyze`: seconds per study and peak memory of :func:`EchoFMEngine.analyze`, end to end.

Cases (phantom studies with known truth, so the numbers are checked too):
- ``echonet``: an EchoNet-Dynamic-sized cine, 112x112 at 50 fps (``--frames``, default 200), in memory;
- ``dicom``: a 60-frame 800x600 RGB DICOM with an ECG waveform, read from disk.
Models are built at the preset's size with random weights (timing only: the outputs are not
meaningful) for the tasks the pipeline runs per cine: view, segment (ED/ES frames), AS, EF.
By default the view, AS and EF heads sit on one frozen encoder (the paper's linear-probe setting:
one encoder pass per window serves all three) and the segmenter has its own fine-tuned encoder;
``--own-encoders`` gives every model its own encoder (the slowest deployment).
Each case runs in its own process so that the peak memory (RSS on CPU, allocator peak on CUDA)
is that case's alone. Seconds per stage (read, phase, each model or shared-encoder group,
measurements, figure) are printed; ``--repeat N`` times N calls and reports medians.

``--batch N``: archive throughput instead. N phantom studies go through the batch ``analyze``
(:func:`~EchoFMEngine.analysis.analyze_paths`, resume and CSVs included); under ``torchrun`` every
process prints its studies/s and rank 0 the total, so 1 and N processes can be compared.
"""
from __future__ import annotations

import argparse
import inspect
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..tasks import SEGMENTATION, get_task, tasks_of
from ..analysis import analyze, analyze_paths
from ..analysis.inference import encoder_groups, quantize_int8
from ..analysis.summary import summary_figure
from ..clinical.phantoms import make_study, write_dicom
from ..models import build_echofm
from ..models.heads import build_new_task_model
from ..runtime import distributed

TASKS = tasks_of(analysed=True)        # the tasks a cine's analysis runs: view, segment, as, ef


def timing_models(preset: str, tasks=TASKS, img_size: Optional[int] = None, shared_encoder: bool = True) -> dict:
    """Random-weight task models of ``preset`` with the descriptions the pipeline reads; with
    ``shared_encoder`` the clip-level heads (view, AS, EF) sit on one frozen encoder."""
    models = {}
    shared = None
    for task in tasks:
        enc = build_echofm(preset, **({"img_size": img_size} if img_size else {}))
        pooled = get_task(task).kind != SEGMENTATION          # clip-level heads share the encoder
        if shared_encoder and pooled:
            shared = shared or enc
            enc = shared
        c = enc.cfg
        labels = list(get_task(task).classes)
        m = build_new_task_model(enc, task, len(labels), freeze_encoder=shared_encoder and pooled)
        m.description = {"task": task, "labels": labels,
                         "input": {"frames": c.num_frames, "height": c.img_size, "width": c.img_size}}
        models[task] = m.eval()
    return models


def run_case(case: str, preset: str, frames: int, device: str, tasks=TASKS, segment: str = "ed_es",
             img_size: Optional[int] = None, max_cycles: Optional[int] = None, shared_encoder: bool = True,
             int8: bool = False, repeat: int = 1, threads: Optional[int] = None) -> dict:
    """``repeat`` timed analyses (after one untimed warm-up call on the same cine), medians per stage."""
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    if case == "echonet":
        study = make_study("A4C", n_frames=frames, size=(112, 112), fps=50.0, heart_rate_bpm=72, seed=1)
        target, tmp = study.cine, None
    else:
        study = make_study("A4C", n_frames=frames, size=(600, 800), fps=30.0, heart_rate_bpm=72, seed=1)
        tmp = tempfile.TemporaryDirectory()
        target = write_dicom(study, Path(tmp.name) / "study.dcm")
    models = timing_models(preset, tasks, img_size, shared_encoder)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if int8 and dev.type != "cpu":
        raise SystemExit("--int8 (dynamic int8 linear layers) runs on the CPU only")
    for m in models.values():
        m.to(dev)
    if int8:
        models = quantize_int8(models, inplace=True)      # no fp32 copy kept: memory as measured
    groups = encoder_groups(models)
    kw = dict(models=models, device=str(dev), segment=segment, max_cycles=max_cycles)
    if "view" in inspect.signature(analyze).parameters:
        kw["view"] = "A4C"      # random-weight view heads are unsure: the phantom is A4C, so segment it anyway
    analyze(target, **kw)       # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
    runs, stages = [], {}
    fig_dir = tempfile.TemporaryDirectory()
    for _ in range(max(1, int(repeat))):
        t0 = time.perf_counter()
        res = analyze(target, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        tf = time.perf_counter()
        summary_figure(study.cine, res, Path(fig_dir.name) / "summary.png")
        figure = time.perf_counter() - tf
        runs.append(time.perf_counter() - t0)
        for k, v in {**res.timing_s, "figure": figure}.items():
            stages.setdefault(k, []).append(v)
    fig_dir.cleanup()
    seconds = statistics.median(runs)
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if tmp is not None:
        tmp.cleanup()
    return {"case": case, "preset": preset, "img_size": models[tasks[0]].cfg.img_size, "frames": frames,
            "device": dev.type, "segment": segment, "max_cycles": max_cycles,
            "windows_cycles": len(res.phase["analysed_cycles"]),
            "seconds": round(seconds, 3), "runs_s": [round(r, 3) for r in runs], "peak_mb": round(peak, 1),
            "timing_s": {k: round(statistics.median(v), 3) for k, v in stages.items()},
            "encoder_groups": groups, "int8": bool(int8),
            "ed_frames": res.phase["ed_frames"], "true_ed_frames": [int(f) for f in study.ed_frames],
            "threads": torch.get_num_threads()}


def run_batch(n: int, models=None, device: str = "cpu", inputs=None) -> Optional[dict]:
    """Studies/s of the batch ``analyze`` on ``n`` phantom cines (or the files under ``inputs``), in
    each of the torchrun processes; the per-rank figures and the total on rank 0 (None elsewhere)."""
    info = distributed.setup("cpu")      # gloo for the gathers; the models go to --device
    tmp = tempfile.TemporaryDirectory(prefix="echofm_bench_batch_") if info.is_main else None
    try:
        work = Path(distributed.broadcast_object(tmp.name if tmp else None, info))
        if inputs is None and info.is_main:
            (work / "in").mkdir()
            # EchoNet-sized phantom cines as .npy (no codec cost in the timing); four distinct ones, repeated
            cines = [np.asarray(make_study("A4C", n_frames=100, size=(112, 112), fps=50.0, heart_rate_bpm=60 + 9 * k,
                                           seed=k).cine.frames, dtype=np.uint8) for k in range(min(n, 4))]
            for i in range(n):
                np.save(work / "in" / f"s{i:04d}.npy", cines[i % len(cines)])
        if models is None and info.is_main:
            (work / "no_models").mkdir()
        distributed.barrier(info)
        t0 = time.perf_counter()
        res = analyze_paths([inputs or work / "in"], work / "out", models=models or work / "no_models",
                            device=device, summary=False, progress=False)
        wall = time.perf_counter() - t0
        mine = {"rank": info.rank, "world_size": info.world_size, "studies": len(res["done"]),
                "failed": len(res["failed"]), "seconds": round(res["seconds"], 3),
                "studies_per_s": round(len(res["done"]) / max(res["seconds"], 1e-9), 3)}
        print(json.dumps(mine), flush=True)
        every = distributed.gather_objects({**mine, "wall_s": wall}, info)
        distributed.barrier(info)
    finally:
        if tmp is not None:
            tmp.cleanup()
        distributed.cleanup()
    if not info.is_main:
        return None
    total = sum(r["studies"] for r in every)
    slowest = max(r["wall_s"] for r in every)
    return {"processes": info.world_size, "studies": total, "per_rank_studies_per_s": [r["studies_per_s"] for r in every],
            "sum_of_ranks_studies_per_s": round(sum(r["studies_per_s"] for r in every), 3),
            "wall_s": round(slowest, 3), "total_studies_per_s": round(total / max(slowest, 1e-9), 3),
            "threads_per_process": torch.get_num_threads(), "device": device}


def stage_table(timing: dict) -> str:
    """Seconds per stage, one line each, in pipeline order (``model:a+b`` = one shared encoder)."""
    order = ["read", "phase"] + [k for k in timing if k.startswith("model:")] + ["measure"]
    lines = [f"    {k:<32s} {timing[k]:8.3f} s" for k in order if k in timing]
    other = timing.get("total", 0.0) - sum(timing[k] for k in order if k in timing)
    lines += [f"    {'other (frame preparation)':<32s} {other:8.3f} s",
              f"    {'analysis total':<32s} {timing.get('total', float('nan')):8.3f} s",
              f"    {'figure (summary PNG)':<32s} {timing.get('figure', float('nan')):8.3f} s"]
    return "\n".join(lines)


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m EchoFMEngine bench analyze", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  python -m EchoFMEngine bench analyze --case dicom --preset tiny")
    ap.add_argument("--case", choices=["echonet", "dicom"], action="append",
                    help="case(s) to run (default: both)")
    ap.add_argument("--preset", action="append", help="model preset(s) (default: vit_s and vit_l)")
    ap.add_argument("--frames", type=int, action="append", help="frame count(s) (default: 200 echonet, 60 dicom)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where the models run (default auto: CUDA when available)")
    ap.add_argument("--segment", default="ed_es", choices=["ed_es", "all"],
                    help="segment the ED and ES frames only (default) or every frame")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks with models")
    ap.add_argument("--img-size", type=int, default=None, help="model input size (default: the preset's, 224)")
    ap.add_argument("--max-cycles", type=int, default=None, help="analyse the first N cycles only")
    ap.add_argument("--own-encoders", action="store_true",
                    help="every model has its own encoder (default: view, AS, EF heads share one frozen encoder)")
    ap.add_argument("--int8", action="store_true",
                    help="dynamic int8 quantisation of the encoders' linear layers (CPU; outputs move slightly)")
    ap.add_argument("--repeat", type=int, default=1, help="timed calls per case (medians reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--inline", action="store_true", help="run in this process (one case, one preset)")
    ap.add_argument("--batch", type=int, default=None, metavar="N",
                    help="archive throughput: N phantom studies through batch analyze (per process under torchrun)")
    ap.add_argument("--inputs", default=None, help="with --batch: analyse these files/folder instead of phantoms")
    ap.add_argument("--models", default=None, help="with --batch: models folder (default: none, ED/ES and phase only)")
    a = ap.parse_args(list(argv))
    if a.batch is not None:
        total = run_batch(a.batch, a.models, "cpu" if a.device == "auto" and not torch.cuda.is_available()
                          else a.device, a.inputs)
        if total is not None:
            print(json.dumps(total), flush=True)
        return 0
    cases = a.case or ["echonet", "dicom"]
    presets = a.preset or ["vit_s", "vit_l"]
    tasks = tuple(t for t in a.tasks.split(",") if t)
    rows = []
    for case in cases:
        for preset in presets:
            for frames in a.frames or [200 if case == "echonet" else 60]:
                if a.inline:
                    rows.append(run_case(case, preset, frames, a.device, tasks, a.segment, a.img_size, a.max_cycles,
                                         not a.own_encoders, a.int8, a.repeat, a.threads))
                    continue
                cmd = [sys.executable, "-m", "EchoFMEngine", "bench", "analyze", "--inline", "--case", case,
                       "--preset", preset, "--frames", str(frames), "--device", a.device,
                       "--segment", a.segment, "--tasks", a.tasks]
                cmd += ["--img-size", str(a.img_size)] if a.img_size else []
                cmd += ["--max-cycles", str(a.max_cycles)] if a.max_cycles else []
                cmd += ["--own-encoders"] * a.own_encoders + ["--int8"] * a.int8 + ["--repeat", str(a.repeat)]
                cmd += ["--threads", str(a.threads)] if a.threads else []
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return out.returncode
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{case:8s} {preset:6s}@{r['img_size']} {frames:4d} frames {r['device']:4s} "
                      f"cycles {r['windows_cycles']}{' int8' if r['int8'] else ''}: {r['seconds']:7.2f} s "
                      f"(median of {len(r['runs_s'])}), peak {r['peak_mb']:8.0f} MB, {r['threads']} threads, "
                      f"encoder groups {r['encoder_groups']}", file=sys.stderr, flush=True)
                print(stage_table(r["timing_s"]), file=sys.stderr, flush=True)
    if a.inline:
        print(json.dumps(rows[0]))
    else:
        print(json.dumps(rows, indent=1))
    return 0
