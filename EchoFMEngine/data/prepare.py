"""``python -m EchoFMEngine prepare SRC --out DIR``: cut full-cycle clips from a tree of studies into a cache.

Each readable cine under SRC is loaded, split into clips of T frames holding at least
one full cardiac cycle, preprocessed to S x S (fan masking, crop, resize) and appended
to uint8 shards (see :mod:`EchoFMEngine.data.cache`). Re-running skips sources already
done; unreadable files are listed at the end and in ``failed.csv``.

Sharded (``--shard i/N`` on N machines, or N processes under ``torchrun``): part i takes the i-th
contiguous block of the sorted sources and writes a complete cache of its own under
``OUT/parts/part_i_of_N``, resumable like a plain run. ``--merge`` (run by rank 0 after a barrier under
torchrun) then hard-links the parts' shard files into OUT and writes one index there, equal, row for
row and clip for clip, to a single-process run on the same tree (only shard names and offsets differ).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from EchoFMEngine.data.cache import (DONE_FIELDS, FAILED_FIELDS, INDEX_FIELDS, CacheWriter, _read_csv,
                                     _write_csv_atomic, load_index, read_config, shard_name)
from EchoFMEngine.data.files import find_cines, relative_name, scrub_paths
from EchoFMEngine.runtime import distributed
from EchoFMEngine.cine import CineReadError
from EchoFMEngine.data.clips import cut_clips
from EchoFMEngine.io import load_cine

NO_CLIP = "no clip holding a full cardiac cycle"
PART_FILE = "part.json"        # written by a part when its whole block has been visited
MERGE_FILE = "merge.json"      # the shard links a merge made in OUT (replaced by the next merge)


class ShardError(ValueError):
    """A ``--shard`` spec or a set of parts that cannot be used; the message says why."""


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise ShardError(f"--shard {spec!r}: expected i/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ShardError(f"--shard {spec!r}: need 0 <= i < N")
    return i, n


def part_dir(out, i: int, n: int) -> Path:
    return Path(out) / "parts" / f"part_{i:03d}_of_{n:03d}"


def _digest(names: list[str]) -> str:
    """Identity of the sorted source list, so parts cut from different trees are never merged."""
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:16]


def _init_worker() -> None:
    """One thread per worker process: the pool provides the parallelism."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def process_source(task: tuple) -> tuple[str, Optional[np.ndarray], list[dict], Optional[str]]:
    """Load one source and cut its clips: (relative name, uint8 [n, T, S, S, 3] or None, rows, error)."""
    path, rel, frames, size, full_cycle_only, stride = task

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
            full_cycle_only: bool = True, stride: Optional[int] = None, progress: bool = True,
            shard: Optional[tuple[int, int]] = None) -> dict:
    """Build or resume the cache; returns counts and the (source, reason) failures.
    ``shard=(i, N)``: only the i-th of N contiguous blocks of the sorted sources, into
    :func:`part_dir` (merge the parts with :func:`merge_parts`)."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder not found")
    sources = [p for p in find_cines(src) if out.resolve() not in p.resolve().parents]
    digest = _digest([relative_name(p, src) for p in sources])
    if shard is not None:
        i, n = shard
        sources = [sources[k] for k in distributed.shard_range(len(sources), distributed.DistInfo(i, n))]
        out = part_dir(out, i, n)
        (out / PART_FILE).unlink(missing_ok=True)   # visited again: complete only when this run ends
    writer = CacheWriter(out, frames, size, shard_clips=shard_clips)
    previous = _previous_failures(out)
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
    if shard is not None:   # reached only when the whole block was visited
        _write_json(out / PART_FILE, {"shard": shard[0], "of": shard[1], "sources": len(sources),
                                      "tree": digest, "frames": frames, "size": size})
    return {"sources": len(sources), "skipped_done": skipped_done, "processed": len(tasks),
            "new_clips": n_new, "total_clips": writer.n_clips, "no_clip": no_clip, "failed": failed}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` holds ``src``'s bytes: a hard link (no copy) where the file system allows, else a copy."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _complete_parts(out: Path) -> list[tuple[Path, dict]]:
    """The parts under ``out/parts`` in order, after checking they form one complete split of one tree."""
    found = sorted((out / "parts").glob("part_*_of_*")) if (out / "parts").is_dir() else []
    if not found:
        raise ShardError(f"{out}: no parts to merge (run 'prepare SRC --out {out} --shard i/N' first)")
    splits = {int(p.name.rsplit("_of_", 1)[1]) for p in found}
    if len(splits) != 1:
        raise ShardError(f"{out / 'parts'}: parts of different splits ({sorted(splits)} parts); "
                         f"remove the parts of the split you do not want")
    n = splits.pop()
    parts, missing = [], []
    for i in range(n):
        d = part_dir(out, i, n)
        if not (d / PART_FILE).exists():
            missing.append(f"{i}/{n}")
            continue
        parts.append((d, json.loads((d / PART_FILE).read_text(encoding="utf-8"))))
    if missing:
        raise ShardError(f"{out}: part(s) {', '.join(missing)} not finished; run (or resume) them with "
                         f"--shard, then merge again")
    trees = {meta["tree"] for _, meta in parts}
    shapes = {(meta["frames"], meta["size"]) for _, meta in parts}
    if len(trees) != 1 or len(shapes) != 1:
        raise ShardError(f"{out}: the parts were cut from different source trees or clip sizes; "
                         f"re-run the stale parts")
    return parts


def merge_parts(out) -> dict:
    """One cache in ``out`` from its finished parts: their shard files hard-linked in part order, one
    ``index.csv`` / ``done.csv`` / ``failed.csv`` in the order a single-process run writes them.
    Re-running replaces the previous merge; a folder holding clips of its own is refused."""
    out = Path(out)
    parts = _complete_parts(out)
    frames, size = parts[0][1]["frames"], parts[0][1]["size"]
    writer = CacheWriter(out, frames, size)          # checks cache.json, clears torn files
    previous = json.loads((out / MERGE_FILE).read_text(encoding="utf-8"))["shards"] if (out / MERGE_FILE).exists() else []
    own = sorted(p.name for p in out.glob("shard_*.npy") if p.name not in previous)
    if own:
        raise ShardError(f"{out}: holds clips written by a non-sharded run ({own[0]}, ...); merge into another --out")
    del writer
    rows, done, errors, no_clip, linked = [], [], [], [], []
    for d, _meta in parts:
        part_rows, part_done = load_index(d)
        names = {}
        for r in part_rows:
            if r["shard"] not in names:
                names[r["shard"]] = shard_name(len(linked))
                _link_or_copy(d / r["shard"], out / names[r["shard"]])
                linked.append(names[r["shard"]])
            rows.append({**r, "shard": names[r["shard"]], "full_cycle": int(r["full_cycle"])})
        done += [{"source": s, "n_clips": c} for s, c in part_done.items()]
        for f in _read_csv(d / "failed.csv"):
            (no_clip if f["reason"] == NO_CLIP else errors).append(f)
    for name in set(previous) - set(linked):
        (out / name).unlink(missing_ok=True)
    _write_csv_atomic(out / "index.csv", INDEX_FIELDS, rows)
    _write_csv_atomic(out / "done.csv", DONE_FIELDS, done)
    _write_csv_atomic(out / "failed.csv", FAILED_FIELDS, errors + no_clip)
    _write_json(out / MERGE_FILE, {"parts": len(parts), "shards": linked})
    return {"parts": len(parts), "sources": sum(m["sources"] for _, m in parts), "total_clips": len(rows),
            "failed": [(f["source"], f["reason"]) for f in errors], "no_clip": [f["source"] for f in no_clip]}


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m EchoFMEngine prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Cut full-cycle clips from a tree of echo studies into a clip cache.",
                                epilog="example:\n  python -m EchoFMEngine phantom --out phantoms --n 4\n"
                                       "  python -m EchoFMEngine prepare phantoms --out cache --frames 16 --size 64\n"
                                       "sharded (one command per machine, then one merge):\n"
                                       "  python -m EchoFMEngine prepare phantoms --out cache --shard 0/2\n"
                                       "  python -m EchoFMEngine prepare phantoms --out cache --shard 1/2\n"
                                       "  python -m EchoFMEngine prepare --merge --out cache\n"
                                       "under torchrun (rank 0 merges after all ranks finish):\n"
                                       "  torchrun --nproc_per_node 2 -m EchoFMEngine prepare phantoms --out cache")
    p.add_argument("src", nargs="?", help="folder of DICOM / AVI / MP4 / NRRD / NIfTI cines (searched recursively)")
    p.add_argument("--out", required=True, help="cache folder (created; re-running resumes it)")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="process only block i of N of the sorted sources, into OUT/parts (see --merge)")
    p.add_argument("--merge", action="store_true",
                   help="(without SRC) merge the finished parts in OUT/parts into one cache index in OUT")
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


def _report(res: dict, where: Path, label: str = "") -> None:
    """What a run (or a merge) did, on stdout; problems are listed by relative name only."""
    if "processed" in res:
        print(f"{label}sources: {res['sources']} found, {res['skipped_done']} already done, {res['processed']} processed")
        print(f"{label}clips: {res['new_clips']} new, {res['total_clips']} in {where}")
    else:
        print(f"{label}merged {res['parts']} parts: {res['sources']} sources, {res['total_clips']} clips in {where}")
    if res["no_clip"]:
        print(f"{label}no full-cycle clip: {len(res['no_clip'])} source(s) (listed in failed.csv)")
    if res["failed"]:
        print(f"{label}failed: {len(res['failed'])} source(s) skipped (see {where / 'failed.csv'}):")
        for rel, reason in res["failed"]:
            print(f"  {rel}: {reason}")
    else:
        print(f"{label}failed: 0")


def cli(argv: Sequence[str]) -> int:
    """Entry point of ``python -m EchoFMEngine prepare``."""
    a = _parse(argv)
    if a.frames < 1 or a.size < 16 or a.workers < 1 or a.shard_clips < 1:
        print("error: --frames >= 1, --size >= 16, --workers >= 1 and --shard-clips >= 1 are required",
              file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.merge and (a.src is not None or a.shard) or not a.merge and a.src is None:
        print("error: give SRC (optionally with --shard i/N), or --merge alone", file=sys.stderr)
        return 2
    if a.shard and world > 1:
        print("error: under torchrun the shard is the process's rank; drop --shard", file=sys.stderr)
        return 2
    info = None
    try:
        shard = parse_shard(a.shard) if a.shard else None
        if a.merge:
            res = merge_parts(a.out)
            _report(res, Path(a.out))
            return 0 if res["total_clips"] else _empty()
        if world > 1:
            info = distributed.setup("cpu")          # gloo: only barriers travel between the ranks
            shard = (info.rank, info.world_size)
        res = prepare(a.src, a.out, frames=a.frames, size=a.size, workers=a.workers, shard_clips=a.shard_clips,
                      full_cycle_only=not a.allow_partial, stride=a.stride, progress=not a.no_progress,
                      shard=shard)
        label = f"[part {shard[0]}/{shard[1]}] " if shard else ""
        _report(res, part_dir(a.out, *shard) if shard else Path(a.out), label)
        if info is not None:
            distributed.barrier(info)
            if not info.is_main:
                return 0
            res = merge_parts(a.out)
            _report(res, Path(a.out))
        elif shard:
            print(f"when all {shard[1]} parts are done: python -m EchoFMEngine prepare --merge --out {a.out}")
            return 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if info is not None:
            distributed.cleanup()
    return 0 if res["total_clips"] else _empty()


def _empty() -> int:
    print("error: the cache holds no clips", file=sys.stderr)
    return 1
