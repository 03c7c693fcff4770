"""`python -m EchoFMEngine bench phase`: seconds per cine of image-only ED/ES detection."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from EchoFMEngine.io import load_cine
from EchoFMEngine.clinical.phase import detect_ed_es
from EchoFMEngine.clinical.phantoms import make_study


def _time(cine, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        detect_ed_es(cine)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cli(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m EchoFMEngine bench phase",
        description="Median seconds per cine of ED/ES from the images (reading not included): the given "
                    "cines (ECG ignored) and two phantoms (200 frames at 112 px; 100 frames at 800x600).",
        epilog="example: python -m EchoFMEngine bench phase ../shared/data/echonet/dev100/Videos/*.avi --limit 20")
    ap.add_argument("paths", nargs="*", help="cine files to time (e.g. the dev100 AVIs)")
    ap.add_argument("--limit", type=int, default=0, help="time at most this many of the paths (0: all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cine; the median is reported")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    rows = {}
    for name, size, frames in (("phantom 200x112x112", (112, 112), 200), ("phantom 100x600x800", (600, 800), 100)):
        st = make_study("A4C", n_frames=frames, size=size, fps=50, heart_rate_bpm=72, ef=55, seed=1)
        rows[name] = _time(dataclasses.replace(st.cine, ecg=None), args.repeat)
    paths = [Path(p) for p in args.paths][: args.limit or None]
    per = [_time(dataclasses.replace(load_cine(p), ecg=None), args.repeat) for p in paths]
    if per:
        rows[f"{len(per)} given cines (median)"] = float(np.median(per))
        rows[f"{len(per)} given cines (max)"] = float(np.max(per))
    for k, v in rows.items():
        print(f"{k:<32} {v:8.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0
