"""Many studies in one run: ``python -m EchoFMEngine analyze PATH... --out DIR``.

Every input file (folders are searched for cine files) is analysed on its own; a file that
fails is reported and skipped, and the run lists the failures at the end (``failed.csv``).
Progress goes to stdout as ``PROGRESS k/n name`` lines (what the Slicer module parses) and to
a tqdm bar on stderr.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Iterable, Optional, Union

from ..cine import CineReadError
from ..models.checkpoint import CheckpointError
from .outputs import csv_row, study_id, write_csv, write_study
from .pipeline import analyze


def expand_inputs(paths: Iterable[Union[str, Path]]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Input files in order (folders searched recursively) and ``(name, reason)`` for paths not found."""
    from ..data.files import find_cines

    files, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = find_cines(p)
            if not found:
                missing.append((p.name, "folder holds no readable cine file"))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            missing.append((p.name, "no such file or folder"))
    return files, missing


def analyze_paths(paths: Iterable[Union[str, Path]], out: Union[str, Path], models=None, device: str = "auto",
                  segment: str = "ed_es", summary: bool = True, progress: bool = True,
                  max_cycles: Optional[int] = None) -> dict:
    """Analyse every input, write one folder per study plus ``results.csv`` (and ``failed.csv``).

    Returns ``{"done": [study ids], "failed": [(file name, reason)], "out": folder}``."""
    from tqdm import tqdm

    from ..io import load_cine
    from .pipeline import load_models

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, failed = expand_inputs(paths)
    store = models if isinstance(models, dict) else load_models(models, device)
    rows, done, taken = [], [], set()
    bar = tqdm(files, desc="analyze", unit="study", disable=not progress, file=sys.stderr)
    for k, path in enumerate(bar):
        try:
            cine = load_cine(path)
            result = analyze(cine, models=store, device=device, segment=segment, max_cycles=max_cycles)
            sid = study_id(path.name, taken)
            write_study(result, out, sid, cine=cine, summary=summary)
            d = result.to_dict()
            rows.append(csv_row(sid, d))
            done.append(sid)
        except (CineReadError, ValueError, CheckpointError, OSError, RuntimeError) as e:
            reason = str(e).replace(str(path), path.name).replace(str(path.parent), ".")
            failed.append((path.name, reason))
            print(f"error: {path.name}: {reason}", file=sys.stderr)
        if progress:
            print(f"PROGRESS {k + 1}/{len(files)} {path.name}", flush=True)
    write_csv(rows, out / "results.csv")
    if failed:
        with open(out / "failed.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["input", "reason"])
            w.writerows(failed)
    return {"done": done, "failed": failed, "out": str(out)}


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m EchoFMEngine analyze",
                                 description="view, ED/ES, masks, volumes, EF and scores for cine loops")
    ap.add_argument("paths", nargs="+", help="cine files or folders of them")
    ap.add_argument("--out", required=True, help="output folder (one sub-folder per study + results.csv)")
    ap.add_argument("--models", default=None, help="models folder (default $ECHOFM_MODELS or ~/.echofm/models)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--segment", default="ed_es", choices=["ed_es", "all"],
                    help="segment the ED and ES frames only (default) or every frame")
    ap.add_argument("--max-cycles", type=int, default=None,
                    help="run the models on the first N full cardiac cycles only (faster; default: all)")
    ap.add_argument("--no-summary", action="store_true", help="skip the PNG summaries (faster batches)")
    a = ap.parse_args(list(argv))
    try:
        report = analyze_paths(a.paths, a.out, models=a.models, device=a.device, segment=a.segment,
                               summary=not a.no_summary, max_cycles=a.max_cycles)
    except (CheckpointError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_ok, n_bad = len(report["done"]), len(report["failed"])
    print(f"analysed {n_ok} stud{'y' if n_ok == 1 else 'ies'} into {a.out}" +
          (f"; {n_bad} failed:" if n_bad else ""))
    for name, reason in report["failed"]:
        print(f"  {name}: {reason}")
    print(json.dumps({"done": n_ok, "failed": n_bad}))
    return 0 if n_ok or not n_bad else 1
