"""`python -m EchoFMEngine phase PATH... --out DIR`: ED/ES of every beat of each cine, one phase-strip
PNG and one JSON per cine, batch-safe; ``--models`` adds a models folder's encoder as an image signal."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from EchoFMEngine.analysis.embedding_signal import encoder_signals, load_store_encoder
from EchoFMEngine.clinical.phase import detect_ed_es
from EchoFMEngine.clinical.phase_strip import save_phase_strip
from EchoFMEngine.io import load_cine
from EchoFMEngine.models.registry import ModelStore


def study_name(path: Path, counter: int) -> str:
    """An output name that does not copy the file name (which may hold a patient's name)."""
    return f"cine-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}-{counter:03d}"


def cli(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m EchoFMEngine phase",
        description="ED/ES of every beat of each cine (ECG when usable, else images): one PNG phase strip "
                    "and one JSON per cine; a file that cannot be read is reported and skipped.",
        epilog="example: python -m EchoFMEngine phase ../shared/data/echonet/traced3/Videos/*.avi --out runs/phase")
    ap.add_argument("paths", nargs="+", help="cine files (any format load_cine reads)")
    ap.add_argument("--out", required=True, help="folder for <id>.png and <id>.json per cine")
    ap.add_argument("--no-ecg", action="store_true", help="ignore any ECG and use the images")
    ap.add_argument("--models", help="a models folder: its pretrained EchoFM encoder's frame embeddings join the "
                                     "image signals (nothing is downloaded)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = None
    if args.models:
        encoder, source = load_store_encoder(ModelStore(args.models))
        print(f"encoder signal: {source}" if encoder is not None else f"no encoder in {args.models}: images only")
    failed = 0
    for i, p in enumerate(map(Path, args.paths)):
        sid = study_name(p, i)
        try:
            t0 = time.perf_counter()
            cine = load_cine(p)
            if args.no_ecg:
                cine.ecg = None
            phase = detect_ed_es(cine, extra_signals=encoder_signals(cine, encoder) if encoder is not None else None)
            result = {"id": sid, **phase.to_dict(), "frames": cine.num_frames, "fps": cine.fps,
                      "seconds": round(time.perf_counter() - t0, 3)}
            save_phase_strip(cine, phase, out / f"{sid}.png", title=sid)
            (out / f"{sid}.json").write_text(json.dumps(result, indent=1))
            print(f"{sid}: {len(phase.ed_frames)} ED, {len(phase.es_frames)} ES, {phase.method}"
                  + (f", flags: {', '.join(f['name'] for f in phase.flags)}" if phase.flags else ""))
        except Exception as exc:  # one bad file never stops the batch
            failed += 1
            print(f"{sid}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failed else 0
