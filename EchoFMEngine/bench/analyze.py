"""`bench analyze`: seconds per study and peak memory of :func:`EchoFMEngine.analyze`, end to end.

Cases (phantom studies with known truth, so the numbers are checked too):
- ``echonet``: an EchoNet-Dynamic-sized cine, 112x112 at 50 fps (``--frames``, default 200), in memory;
- ``dicom``: a 60-frame 800x600 RGB DICOM with an ECG waveform, read from disk.
Models are built at the preset's size with random weights (timing only: the outputs are not
meaningful) for the tasks the pipeline runs per cine: view, segment (ED/ES frames), AS, EF.
Each case runs in its own process so that the peak memory (RSS on CPU, allocator peak on CUDA)
is that case's alone.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

TASKS = ("view", "segment", "as", "ef")


def timing_models(preset: str, tasks=TASKS, img_size: Optional[int] = None) -> dict:
    """Random-weight task models of ``preset`` with the descriptions the pipeline reads."""
    from ..models import build_echofm
    from ..models.heads import EchoFMClassifier, EchoFMRegressor, EchoFMSegmenter

    models = {}
    for task in tasks:
        enc = build_echofm(preset, **({"img_size": img_size} if img_size else {}))
        c = enc.cfg
        if task == "segment":
            m = EchoFMSegmenter(enc)
            labels = ["background", "lv_cavity", "lv_myocardium", "la"]
        elif task == "ef":
            m, labels = EchoFMRegressor(enc), ["ef"]
        else:
            labels = ["A2C", "A4C", "PLAX", "PSAX", "other"] if task == "view" else ["absent", "present"]
            m = EchoFMClassifier(enc, n_classes=len(labels))
        m.description = {"task": task, "labels": labels,
                         "input": {"frames": c.num_frames, "height": c.img_size, "width": c.img_size}}
        models[task] = m.eval()
    return models


def run_case(case: str, preset: str, frames: int, device: str, tasks=TASKS, segment: str = "ed_es",
             img_size: Optional[int] = None, max_cycles: Optional[int] = None) -> dict:
    """One timed analysis (after one untimed warm-up call on the same cine)."""
    from ..analysis import analyze
    from ..synthetic import make_study, write_dicom

    torch.manual_seed(0)
    if case == "echonet":
        study = make_study("A4C", n_frames=frames, size=(112, 112), fps=50.0, heart_rate_bpm=72, seed=1)
        target, tmp = study.cine, None
    else:
        study = make_study("A4C", n_frames=frames, size=(600, 800), fps=30.0, heart_rate_bpm=72, seed=1)
        tmp = tempfile.TemporaryDirectory()
        target = write_dicom(study, Path(tmp.name) / "study.dcm")
    models = timing_models(preset, tasks, img_size)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    for m in models.values():
        m.to(dev)
    kw = dict(models=models, device=str(dev), segment=segment, max_cycles=max_cycles)
    analyze(target, **kw)       # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    res = analyze(target, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if tmp is not None:
        tmp.cleanup()
    return {"case": case, "preset": preset, "img_size": models[tasks[0]].cfg.img_size, "frames": frames,
            "device": dev.type, "segment": segment, "max_cycles": max_cycles,
            "windows_cycles": len(res.phase["analysed_cycles"]),
            "seconds": round(seconds, 3), "peak_mb": round(peak, 1), "timing_s": res.timing_s,
            "ed_frames": res.phase["ed_frames"], "true_ed_frames": [int(f) for f in study.ed_frames],
            "threads": torch.get_num_threads()}


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m EchoFMEngine bench analyze", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["echonet", "dicom"], action="append",
                    help="case(s) to run (default: both)")
    ap.add_argument("--preset", action="append", help="model preset(s) (default: vit_s and vit_l)")
    ap.add_argument("--frames", type=int, action="append", help="frame count(s) (default: 200 echonet, 60 dicom)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--segment", default="ed_es", choices=["ed_es", "all"])
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks with models")
    ap.add_argument("--img-size", type=int, default=None, help="model input size (default: the preset's, 224)")
    ap.add_argument("--max-cycles", type=int, default=None, help="analyse the first N cycles only")
    ap.add_argument("--inline", action="store_true", help="run in this process (one case, one preset)")
    a = ap.parse_args(list(argv))
    cases = a.case or ["echonet", "dicom"]
    presets = a.preset or ["vit_s", "vit_l"]
    tasks = tuple(t for t in a.tasks.split(",") if t)
    rows = []
    for case in cases:
        for preset in presets:
            for frames in a.frames or [200 if case == "echonet" else 60]:
                if a.inline:
                    rows.append(run_case(case, preset, frames, a.device, tasks, a.segment, a.img_size, a.max_cycles))
                    continue
                cmd = [sys.executable, "-m", "EchoFMEngine", "bench", "analyze", "--inline", "--case", case,
                       "--preset", preset, "--frames", str(frames), "--device", a.device,
                       "--segment", a.segment, "--tasks", a.tasks]
                cmd += ["--img-size", str(a.img_size)] if a.img_size else []
                cmd += ["--max-cycles", str(a.max_cycles)] if a.max_cycles else []
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return out.returncode
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{case:8s} {preset:6s}@{r['img_size']} {frames:4d} frames {r['device']:4s} "
                      f"cycles {r['windows_cycles']}: {r['seconds']:7.2f} s, "
                      f"peak {r['peak_mb']:8.0f} MB  {r['timing_s']}", file=sys.stderr, flush=True)
    if a.inline:
        print(json.dumps(rows[0]))
    else:
        print(json.dumps(rows, indent=1))
    return 0
