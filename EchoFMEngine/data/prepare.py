"""``python -m EchoFMEngine prepare SRC --out DIR``: cut full-cycle clips from a tree of studies into a cache.

Each readable cine under SRC is loaded, split into clips of T frames holding at least
one full cardiac cycle, preprocessed to S x S (fan masking, crop, resize) and appended
to uint8 shards (see :mod:`EchoFMEngine.data.cache`). Re-running skips sources already
done; unreadable files are listed at the end and in ``failed.csv``.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from EchoFMEngine.data.cache import CacheWriter
from EchoFMEngine.data.files import find_cines, relative_name, scrub_paths

NO_CLIP = "no clip holding a full cardiac cycle"


def _init_worker() -> None:
    """One thread per worker process: the pool provides the parallelism."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def process_source(task: tuple) -> tuple[str, Optional[np.ndarray], list[dict], Optional[str]]:
    """Load one source and cut its clips: (relative name, uint8 [n, T, S, S, 3] or None, rows, error)."""
    path, rel, frames, size, full_cycle_only, stride = task
    from EchoFMEngine.cine import CineReadError
    from EchoFMEngine.data.clips import cut_clips
    from EchoFMEngine.io import load_cine

    try:
        cine = load_cine(path)
        clips, rows = cut_clips(cine, frames, size, full_cycle_only=full_cycle_only, stride=stride)
    except CineReadError as exc:
        return rel, None, [], scrub_paths(exc.reason, path, rel)
    except MemoryError:
        return rel, None, [], "out of memory while reading"
    except Exception as exc:  # a bad file must not stop the batch; the reason is reported
        return rel, None, [], scrub_paths(f"{type(exc).__name__}: {exc}", path, rel)
    return rel, clips, rows, None


def _previous_failures(out: Path) -> dict[str, str]:
    p = out / "failed.csv"
    if not p.exists():
        return {}
    with open(p, newline="", encoding="utf-8") as fh:
        return {r["source"]: r["reason"] for r in csv.DictReader(fh) if r.get("source")}


def prepare(src, out, frames: int = 32, size: int = 224, workers: int = 1, shard_clips: int = 64,
            full_cycle_only: bool = True, stride: Optional[int] = None, progress: bool = True) -> dict:
    """Build or resume the cache; returns counts and the (source, reason) failures."""
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder not found")
    writer = CacheWriter(out, frames, size, shard_clips=shard_clips)
    previous = _previous_failures(out)
    sources = [p for p in find_cines(src) if out.resolve() not in p.resolve().parents]
    todo = [(str(p), relative_name(p, src)) for p in sources]
    todo = [(p, rel) for p, rel in todo if rel not in writer.done]
    skipped_done = len(sources) - len(todo)
    tasks = [(p, rel, frames, size, full_cycle_only, stride) for p, rel in todo]
    failed: list[tuple[str, str]] = []
    no_clip: list[str] = []
    n_new = 0
    bar = tqdm(total=len(tasks), unit="file", desc="prepare", disable=not progress, file=sys.stderr)
    pool = None
    try:
        if workers > 1 and len(tasks) > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(min(workers, len(tasks)), initializer=_init_worker)
            results = pool.imap(process_source, tasks, chunksize=1)
        else:
            results = map(process_source, tasks)
        for rel, clips, rows, error in results:
            bar.update(1)
            if error is not None:
                failed.append((rel, error))
                continue
            if clips is None or len(clips) == 0:
                no_clip.append(rel)
                clips = np.zeros((0, frames, size, size, 3), np.uint8)
            writer.add(rel, clips, rows)
            n_new += len(rows)
            bar.set_postfix(clips=writer.n_clips + writer.queued, failed=len(failed))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        writer.close()  # whole sources only: everything queued is complete
        # failed.csv: this run's problems plus earlier notes on sources not revisited now
        redone = {rel for _, rel in todo}
        kept = [(s, r) for s, r in previous.items() if s not in redone and s in writer.done]
        writer.write_failed(kept + failed + [(rel, NO_CLIP) for rel in no_clip])
    return {"sources": len(sources), "skipped_done": skipped_done, "processed": len(tasks),
            "new_clips": n_new, "total_clips": writer.n_clips, "no_clip": no_clip, "failed": failed}


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m EchoFMEngine prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Cut full-cycle clips from a tree of echo studies into a clip cache.",
                                epilog="example:\n  python -m EchoFMEngine phantom --out phantoms --n 4\n"
                                       "  python -m EchoFMEngine prepare phantoms --out cache --frames 16 --size 64")
    p.add_argument("src", help="folder of DICOM / AVI / MP4 / NRRD / NIfTI cines (searched recursively)")
    p.add_argument("--out", required=True, help="cache folder (created; re-running resumes it)")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="parallel reader processes (default: min(4, CPUs))")
    p.add_argument("--frames", type=int, default=32, help="frames per clip T (default 32)")
    p.add_argument("--size", type=int, default=224, help="clip side S in pixels (default 224)")
    p.add_argument("--shard-clips", type=int, default=64, help="clips per shard file (default 64)")
    p.add_argument("--stride", type=int, default=None,
                   help="source frames between clip starts (default: one clip per cycle)")
    p.add_argument("--allow-partial", action="store_true",
                   help="also keep clips where no full cycle could be confirmed (flagged full_cycle=0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(list(argv))


def cli(argv: Sequence[str]) -> int:
    """Entry point of ``python -m EchoFMEngine prepare``."""
    a = _parse(argv)
    if a.frames < 1 or a.size < 16 or a.workers < 1 or a.shard_clips < 1:
        print("error: --frames >= 1, --size >= 16, --workers >= 1 and --shard-clips >= 1 are required",
              file=sys.stderr)
        return 2
    try:
        res = prepare(a.src, a.out, frames=a.frames, size=a.size, workers=a.workers, shard_clips=a.shard_clips,
                      full_cycle_only=not a.allow_partial, stride=a.stride, progress=not a.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sources: {res['sources']} found, {res['skipped_done']} already done, {res['processed']} processed")
    print(f"clips: {res['new_clips']} new, {res['total_clips']} in {a.out}")
    if res["no_clip"]:
        print(f"no full-cycle clip: {len(res['no_clip'])} source(s) (listed in failed.csv)")
    if res["failed"]:
        print(f"failed: {len(res['failed'])} source(s) skipped (see {Path(a.out) / 'failed.csv'}):")
        for rel, reason in res["failed"]:
            print(f"  {rel}: {reason}")
    else:
        print("failed: 0")
    if res["total_clips"] == 0:
        print("error: the cache holds no clips", file=sys.stderr)
        return 1
    return 0
