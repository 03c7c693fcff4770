"""Many studies in one run: ``python -m EchoFMEngine analyze PATH... --out DIR``.

Every input file (folders are searched for cine files; a ``.csv`` or ``.txt`` list of paths and
glob patterns are read too) is analysed on its own. Whatever goes wrong with one study (any
exception) is written to ``failed.csv`` with the reason, and the batch goes on. Each study's
folder is written under a hidden name and renamed when complete (complete or absent), and its
row is appended to ``results.csv`` as it finishes, so a crash keeps every finished study.

The run owns ``--out`` (``.echofm.lock`` with pid and host): a second writer is refused. Running
the same command again into the same folder resumes (complete studies are skipped); a different
set of inputs or options into a used folder is refused. Out of disk space, the run stops after
the current study with valid CSVs. Under ``torchrun`` the inputs are shared out over the ranks
and rank 0 merges one ``results.csv`` / ``failed.csv``, equal to a one-process run's.
Exit status: 0 every study done, 1 some failed (or the run stopped), 2 usage or output-folder error.
Progress goes to stdout as ``PROGRESS k/n name`` lines (what the Slicer module parses) and to
a tqdm bar on stderr.
"""
from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Union

import torch.distributed as dist
from tqdm import tqdm

from ..atomic import AppendCSV, LockedError, RunLock, atomic_write_text, is_disk_full, remove_stale_temporaries
from ..cine import CineReadError
from ..models.checkpoint import CheckpointError
from .outputs import CSV_COLUMNS, csv_row, study_id, write_paths, write_study
from ..tasks import LABEL_TEXT
from .pipeline import VIEWS, analyze, load_models
from ..data.files import find_cines
from ..io import load_cine

RUN_FILE = ".echofm-run.json"
FAILED_COLUMNS = ["input", "reason"]


class OutputFolderError(ValueError):
    """``--out`` cannot be used: not writable, a file, owned by another run, or holding another run."""


def _read_list(path: Path) -> list[str]:
    """Paths from a ``.txt`` (one a line) or ``.csv`` list (column ``path``/``file``/``input``, else the first),
    relative paths taken from the list's folder."""
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
        if not rows:
            return []
        head = [h.strip().lower() for h in rows[0]]
        col = next((head.index(c) for c in ("path", "file", "filename", "input") if c in head), None)
        items = [r[col if col is not None else 0] for r in (rows[1:] if col is not None else rows) if r]
    else:
        items = [line for line in path.read_text(encoding="utf-8").splitlines()]
    items = [i.strip() for i in items if i.strip() and not i.strip().startswith("#")]
    return [i if Path(i).is_absolute() else str(path.parent / i) for i in items]


def _is_list_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in (".csv", ".txt")


def expand_inputs(paths: Iterable[Union[str, Path]]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Input files in order (folders searched recursively, glob patterns expanded, ``.csv``/``.txt``
    lists read) and ``(name, reason)`` for paths not found."""
    files, missing = [], []
    for raw in map(str, paths):
        p = Path(raw)
        if not p.exists() and glob.has_magic(raw):
            found = sorted(Path(g) for g in glob.glob(raw, recursive=True))
            found = [f for f in found if f.is_file()]
            if not found:
                missing.append((p.name, "pattern matches no file"))
            files += found
        elif p.is_dir():
            found = find_cines(p)
            if not found:
                missing.append((p.name, "folder holds no readable cine file"))
            files += found
        elif _is_list_file(p):
            sub, gone = expand_inputs(_read_list(p))
            files += sub
            missing += gone
        elif p.is_file():
            files.append(p)
        else:
            missing.append((p.name, "no such file or folder"))
    return files, missing


def _check_out(out: Path) -> None:
    """Refuse an output folder that cannot be created or written, with the reason."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.tmp.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputFolderError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _complete(out: Path, sid: str) -> bool:
    """A study folder is complete when its ``result.json`` (written last) parses."""
    try:
        json.loads((out / sid / "result.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def _row_of(out: Path, sid: str) -> dict:
    return csv_row(sid, json.loads((out / sid / "result.json").read_text()))


def _run_identity(items: list, options: dict) -> dict:
    """What makes two runs the same run (resumable): the inputs (hashed, no paths kept) and options."""
    h = hashlib.sha256()
    for path, sid in items:
        h.update(f"{Path(path).resolve()}\t{sid}\n".encode())
    return {"format": "echofm-analyze-run-v1", "n_inputs": len(items), "inputs_sha256": h.hexdigest(),
            "options": options}


def _prepare_folder(out: Path, identity: dict) -> set:
    """Resume or start a run in ``out`` (caller holds the lock); return the study ids already complete.

    Same inputs and options: resume (results.csv repaired to the complete folders). Another run's
    folder, or results from before run files existed: refused."""
    results = AppendCSV(out / "results.csv", CSV_COLUMNS)
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())
        except ValueError:
            previous = None
        if previous != identity:
            raise OutputFolderError(
                f"--out {out} holds another analysis run (different inputs or options); re-run the same "
                "command to resume it, or choose a new output folder")
    elif (out / "results.csv").exists() or (out / "failed.csv").exists():
        raise OutputFolderError(f"--out {out} holds results of an earlier run; choose a new output folder")
    remove_stale_temporaries(out)
    shutil.rmtree(out / ".ranks", ignore_errors=True)
    atomic_write_text(run_file, json.dumps(identity, indent=2))
    return set()


def _resume_rows(out: Path, items: list) -> tuple[list, set]:
    """Rows of the complete studies in input order (a folder that lost its row gets it back)."""
    have = {r["study_id"]: r for r in AppendCSV(out / "results.csv", CSV_COLUMNS).read()}
    rows, done = [], set()
    for _path, sid in items:
        if _complete(out, sid):
            rows.append(have.get(sid) or _row_of(out, sid))
            done.add(sid)
    return rows, done


def _dist():
    """(rank, world) under torchrun (process group joined), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def _broadcast(obj, rank: int, world: int):
    if world <= 1:
        return obj

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def analyze_paths(paths: Iterable[Union[str, Path]], out: Union[str, Path], models=None, device: str = "auto",
                  segment: str = "ed_es", summary: bool = True, progress: bool = True,
                  max_cycles: Optional[int] = None, masks=None, view: Optional[str] = None,
                  keep_paths: bool = False) -> dict:
    """Analyse every input, write one folder per study plus ``results.csv`` (and ``failed.csv``).
    ``masks``: ``{frame: label map}`` drawn on the (single) input, propagated to every frame.

    Returns ``{"done": [study ids], "skipped": [ids already complete], "failed": [(file name, reason)],
    "stopped": reason or None, "out": folder}``. Raises :class:`OutputFolderError` when ``out`` cannot
    be used (not writable, owned by another running process, holding another run)."""
    out = Path(out)
    rank, world = _dist()
    files, missing = expand_inputs(paths)
    if masks is not None and len(files) != 1:
        raise ValueError(f"--masks belongs to one cine, but {len(files)} inputs were given")
    taken: set = set()
    items = [(path, study_id(path, taken)) for path in files]     # derived ids: no file name in outputs
    identity = _run_identity(items, {"segment": segment, "max_cycles": max_cycles, "summary": bool(summary),
                                     **({"view": view} if view else {}),
                                     "models": str(models) if isinstance(models, (str, Path)) else None})
    lock = RunLock(out, "analyze")
    error = None
    if rank == 0:
        try:
            _check_out(out)
            lock.acquire()
            if lock.took_over:
                print(f"warning: {out}: took over a stale lock of pid {lock.took_over.get('pid')}", file=sys.stderr)
            _prepare_folder(out, identity)
            prior, _ = _resume_rows(out, items)
            AppendCSV(out / "results.csv", CSV_COLUMNS).reset(prior)
            (out / "failed.csv").unlink(missing_ok=True)     # failures of earlier attempts are retried
        except (OutputFolderError, LockedError, OSError) as e:
            lock.release()
            error = str(e)
    error = _broadcast(error, rank, world)
    if error is not None:
        raise OutputFolderError(error)
    if keep_paths and rank == 0:         # the one file that maps study ids to input paths, on request only
        write_paths(items, out)
    try:
        return _analyze_items(items, missing, out, rank, world, models, device, segment, summary, progress,
                              max_cycles, tqdm, load_cine, load_models, masks=masks, view=view)
    finally:
        lock.release()


def _analyze_items(items, missing, out, rank, world, models, device, segment, summary, progress, max_cycles,
                   tqdm, load_cine, load_models, masks=None, view=None) -> dict:
    _, complete = _resume_rows(out, items)
    todo = [(p, s) for p, s in items if s not in complete]
    mine = todo[rank::world]
    if world > 1:
        (out / ".ranks").mkdir(exist_ok=True)
        results = AppendCSV(out / ".ranks" / f"results.rank{rank}.csv", CSV_COLUMNS)
        failures = AppendCSV(out / ".ranks" / f"failed.rank{rank}.csv", ["index"] + FAILED_COLUMNS)
        results.reset()
        failures.reset()
    else:
        results = AppendCSV(out / "results.csv", CSV_COLUMNS)
        failures = AppendCSV(out / "failed.csv", FAILED_COLUMNS)
    index = {s: i for i, (_p, s) in enumerate(items)}
    failed = list(missing) if rank == 0 else []
    if world == 1:
        for f in failed:
            failures.append(f)
    done, stopped = [], None
    store = models if isinstance(models, dict) else load_models(models, device)
    if progress and rank == 0 and complete:
        print(f"resuming: {len(complete)} of {len(items)} studies already complete in {out}", file=sys.stderr)
    bar = tqdm(mine, desc="analyze" if world == 1 else f"analyze[{rank}]", unit="study",
               disable=not progress, file=sys.stderr)
    t0 = time.perf_counter()
    for k, (path, sid) in enumerate(bar):
        try:
            t_read = time.perf_counter()
            cine = load_cine(path)
            t_read = time.perf_counter() - t_read
            result = analyze(cine, models=store, device=device, segment=segment, max_cycles=max_cycles,
                             masks=masks, view=view)
            result.timing_s["read"] = round(t_read, 4)      # the read happened here, timed around itself
            result.timing_s["total"] = round(result.timing_s.get("total", 0.0) + t_read, 4)
            write_study(result, out, sid, cine=cine, summary=summary)
            results.append(_row_of(out, sid))
            done.append(sid)
        except Exception as e:  # noqa: BLE001 - one study, whatever went wrong, must not stop the batch
            reason = (str(e) or type(e).__name__).replace(str(path), path.name).replace(str(path.parent), ".")
            if not isinstance(e, (CineReadError, ValueError, CheckpointError, OSError)):
                reason = f"{type(e).__name__}: {reason}"
            if is_disk_full(e):
                shutil.rmtree(out / sid, ignore_errors=True) if not _complete(out, sid) else None
                reason = "no space left on device"
                stopped = (f"out of disk space in {out}: stopped after {len(complete) + len(done)} complete "
                           "studies (results.csv lists them); free space and run the same command to resume")
            failed.append((path.name, reason))
            try:
                failures.append(([index[sid]] if world > 1 else []) + [path.name, reason])
            except OSError as e2:
                print(f"error: could not record the failure in failed.csv: {e2}", file=sys.stderr)
            print(f"error: {path.name}: {reason}", file=sys.stderr)
        if progress:
            print(f"PROGRESS {k + 1}/{len(mine)} {sid}", flush=True)
        if stopped:
            print(f"error: {stopped}", file=sys.stderr)
            break
    seconds = time.perf_counter() - t0
    if world > 1:
        failed, stopped = _merge_ranks(out, items, missing, rank, world, failed, stopped)
    return {"done": done, "skipped": sorted(complete), "failed": failed, "stopped": stopped, "out": str(out),
            "seconds": seconds, "rank": rank, "world_size": world}


def _merge_ranks(out, items, missing, rank, world, failed, stopped):
    """Rank 0 writes one results.csv / failed.csv in input order, the same as a one-process run."""
    gathered = [None] * world
    dist.all_gather_object(gathered, stopped)
    stopped = next((s for s in gathered if s), None)
    if rank == 0:
        rows, _ = _resume_rows(out, items)
        AppendCSV(out / "results.csv", CSV_COLUMNS).reset(rows)
        bad = []
        for r in range(world):
            bad += [(int(f["index"]), f["input"], f["reason"])
                    for f in AppendCSV(out / ".ranks" / f"failed.rank{r}.csv", ["index"] + FAILED_COLUMNS).read()]
        failed = list(missing) + [(name, reason) for _i, name, reason in sorted(bad)]
        if failed:
            AppendCSV(out / "failed.csv", FAILED_COLUMNS).reset(failed)
        shutil.rmtree(out / ".ranks", ignore_errors=True)
    failed = _broadcast(failed, rank, world)
    dist.barrier()
    return failed, stopped


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m EchoFMEngine analyze",
                                 description="Analyse cine loops (DICOM, AVI/MP4, NRRD, ...): view, ED/ES, masks, "
                                             "volumes, EF and scores, one folder per study plus results.csv.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Re-running the same command into the same --out resumes (complete studies are\n"
                                        "skipped). Exit status: 0 all done, 1 some studies failed or the run stopped\n"
                                        "(disk full), 2 usage or output-folder error.\n\n"
                                        "example:\n  python -m EchoFMEngine phantom --out phantoms --n 2\n"
                                        "  python -m EchoFMEngine analyze phantoms --out analysis "
                                        "--models runs/demo/models\n"
                                        "  torchrun --nproc-per-node 2 -m EchoFMEngine analyze phantoms --out analysis")
    ap.add_argument("paths", nargs="+", help="cine files, folders of them, glob patterns ('scans/*.dcm', quoted) "
                                             "or a .csv/.txt list of paths")
    ap.add_argument("--out", required=True, help="output folder (one sub-folder per study + results.csv)")
    ap.add_argument("--models", "--folder", dest="models", default=None,
                    help="models folder (default $ECHOFM_MODELS or ~/.echofm/models); --folder is the same option")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where the models run (default auto: CUDA when available)")
    ap.add_argument("--segment", default="ed_es", choices=["ed_es", "all"],
                    help="segment the ED and ES frames only (default) or every frame")
    ap.add_argument("--max-cycles", type=int, default=None,
                    help="run the models on the first N full cardiac cycles only (faster; default: all)")
    ap.add_argument("--no-summary", action="store_true", help="skip the PNG summaries (faster batches)")
    ap.add_argument("--view", default=None, choices=sorted(VIEWS),
                    help="the view of every input as you know it; volumes (apical methods) run only for an "
                         "apical view, said by the view model (confident) or by this option")
    ap.add_argument("--keep-paths", action="store_true",
                    help="write paths.csv (study id -> input path) into --out; without it no output names a file")
    ap.add_argument("--masks", default=None, metavar="FILE.nrrd",
                    help=f"label maps [T, H, W] of one input cine with one or more labelled frames ({LABEL_TEXT}): "
                         "propagated to every frame (docs/propagation.md)")
    a = ap.parse_args(list(argv))
    masks = None
    if a.masks:
        # deferred: clinical.propagate loads SimpleITK (slow), needed only when masks are given
        from ..clinical.propagate import read_mask_frames

        try:
            masks = read_mask_frames(a.masks)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        report = analyze_paths(a.paths, a.out, models=a.models, device=a.device, segment=a.segment,
                               summary=not a.no_summary, max_cycles=a.max_cycles, masks=masks, view=a.view,
                               keep_paths=a.keep_paths)
    except (OutputFolderError, CheckpointError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_ok, n_bad, n_skip = len(report["done"]), len(report["failed"]), len(report["skipped"])
    if report["rank"] != 0:         # under torchrun rank 0 reports for everyone
        return 1 if n_bad or report["stopped"] else 0
    print(f"analysed {n_ok} stud{'y' if n_ok == 1 else 'ies'} into {a.out}" +
          (f" ({n_skip} already complete, skipped)" if n_skip else "") + (f"; {n_bad} failed:" if n_bad else ""))
    for name, reason in report["failed"]:
        print(f"  {name}: {reason}")
    if report["stopped"]:
        print(f"stopped: {report['stopped']}")
    rate = n_ok / report["seconds"] if report["seconds"] > 0 else 0.0      # this process, model work only
    print(json.dumps({"done": n_ok, "skipped": n_skip, "failed": n_bad, "stopped": bool(report["stopped"]),
                      "processes": report["world_size"], "rank0_studies_per_s": round(rate, 3)}))
    return 1 if n_bad or report["stopped"] else 0
