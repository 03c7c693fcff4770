"""`bench propagate`: seconds and peak memory of :func:`EchoFMEngine.propagate_masks` from one ED mask.

Cases (phantom studies with known truth, so the accuracy is reported next to the time):
- ``echonet``: a 112x112 cine at 50 fps (``--frames``, default 200), in memory;
- ``dicom``: a 60-frame 800x600 RGB DICOM, written to and read back from disk.
Each case runs in its own process so that its peak RSS is its own (it includes making the phantom
and, for the DICOM, reading it). ``CPU s`` (process CPU time, all threads) and the load average
next to the wall-clock seconds show how much of the time was spent waiting for a core on a shared
machine. Targets (issue 12, 2 cores): 200-frame 112 px <= 3 s, 60-frame 800x600 <= 10 s, memory
<= 2 GB; the last lines print each figure against its target.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..clinical.phantoms import make_study, write_dicom
from ..clinical.propagate import propagate_masks
from ..io import load_cine

CASES = ("echonet", "dicom")
TARGET_S = {"echonet": 3.0, "dicom": 10.0}
TARGET_MB = 2048.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / s


def run_case(case: str, frames: int) -> dict:
    """Time one propagation of the first ED mask over the whole cine of ``case``."""
    if case == "echonet":
        study = make_study("A4C", n_frames=frames, size=(112, 112), fps=50.0, heart_rate_bpm=72, seed=1)
        cine = study.cine
    elif case == "dicom":
        study = make_study("A4C", n_frames=60, size=(600, 800), fps=30.0, heart_rate_bpm=72, seed=2)
        with tempfile.TemporaryDirectory() as tmp:
            cine = load_cine(write_dicom(study, Path(tmp) / "bench.dcm"))
    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    ed = int(study.ed_frames[0]) if len(study.ed_frames) else 0
    t0, c0 = time.perf_counter(), time.process_time()
    out = propagate_masks(cine, {ed: study.masks[ed]})
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    dice = [_dice(out[t] == 1, study.masks[t] == 1) for t in range(out.shape[0])]
    area = (out == 1).sum(axis=(1, 2)).astype(float)
    truth = (study.masks == 1).sum(axis=(1, 2)).astype(float)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    T, H, W = out.shape
    return {"case": case, "load_avg_1min": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(), "frames": T, "size": f"{W}x{H}", "seconds": round(seconds, 3), "cpu_s": round(cpu, 3),
            "ms_per_frame": round(1000 * seconds / T, 2), "peak_rss_mb": round(rss_mb, 1),
            "mean_dice_lv": round(float(np.mean(dice)), 4), "min_dice_lv": round(float(np.min(dice)), 4),
            "area_corr": round(float(np.corrcoef(area, truth)[0, 1]), 4),
            "target_s": TARGET_S[case], "target_mb": TARGET_MB,
            "ok": bool(seconds <= TARGET_S[case] and rss_mb <= TARGET_MB)}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m EchoFMEngine bench propagate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m EchoFMEngine bench propagate --case echonet --frames 50")
    p.add_argument("--case", choices=CASES + ("all",), default="all", help="which cine (default: all)")
    p.add_argument("--frames", type=int, default=200, help="frames of the echonet case (default 200)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    p.add_argument("--in-process", action="store_true", help="run in this process (peak RSS then shared)")
    return p.parse_args(argv)


def cli(argv) -> int:
    a = _parse(list(argv))
    if a.frames < 2:
        print(f"error: --frames must be >= 2, got {a.frames}", file=sys.stderr)
        return 2
    cases = CASES if a.case == "all" else (a.case,)
    rows = []
    for case in cases:
        if a.in_process or len(cases) == 1:
            rows.append(run_case(case, a.frames))
            continue
        code = ("import json,sys; from EchoFMEngine.bench.propagate import run_case; "
                f"print(json.dumps(run_case({case!r}, {int(a.frames)})))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if res.returncode != 0:
            print(f"error: case {case} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    head = f"{'case':<8} {'frames':>6} {'size':>8} {'s':>7} {'CPU s':>7} {'ms/frame':>9} {'RSS MB':>8} {'Dice':>6} {'corr':>6} ok"
    print(head)
    for r in rows:
        print(f"{r['case']:<8} {r['frames']:>6} {r['size']:>8} {r['seconds']:>7.2f} {r['cpu_s']:>7.2f} "
              f"{r['ms_per_frame']:>9.1f} "
              f"{r['peak_rss_mb']:>8.0f} {r['mean_dice_lv']:>6.3f} {r['area_corr']:>6.3f} "
              f"{'yes' if r['ok'] else 'NO'}")
    for r in rows:
        print(f"{r['frames']}-frame {r['size']} {'DICOM' if r['case'] == 'dicom' else 'cine'}: "
              f"{r['seconds']:.2f} s (target {r['target_s']:.0f} s: {'met' if r['seconds'] <= r['target_s'] else 'MISSED'}), "
              f"CPU {r['cpu_s']:.2f} s, load average {r['load_avg_1min']:.1f} on {r['cpu_count']} cores")
    peak = max(r["peak_rss_mb"] for r in rows)
    print(f"peak memory: {peak:.0f} MB (target {TARGET_MB:.0f} MB: {'met' if peak <= TARGET_MB else 'MISSED'})")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0
