"""The pretraining clip cache: uint8 shards read memory-mapped, plus its index and writer.

Layout of a cache folder::

    cache.json        frames T, size S, format version
    shard_00000.npy   uint8 [N, T, S, S, 3] (plain .npy, opened with mmap_mode="r")
    index.csv         one row per clip: shard, offset, source, start_frame, end_frame, fps, full_cycle
    done.csv          sources finished (source, n_clips): a re-run skips them
    failed.csv        sources that could not be used in the last run, with the reason

Crash safety: a shard is written to a temporary file and renamed; its index rows are
appended before its sources' done rows, and on opening only rows of done sources
whose shard exists are kept, so a torn run is cleaned up and resumed.
Source names are relative to the source root (no absolute paths, no header text).
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

FORMAT = "echofm-clip-cache"
VERSION = 1
INDEX_FIELDS = ["shard", "offset", "source", "start_frame", "end_frame", "fps", "full_cycle"]
DONE_FIELDS = ["source", "n_clips"]
FAILED_FIELDS = ["source", "reason"]


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def _parse_index_row(row: dict) -> Optional[dict]:
    """A typed index row, or None for a torn/malformed line."""
    try:
        out = {
            "shard": str(row["shard"]), "offset": int(row["offset"]), "source": str(row["source"]),
            "start_frame": int(row["start_frame"]), "end_frame": int(row["end_frame"]),
            "fps": float(row["fps"]), "full_cycle": str(row["full_cycle"]).strip() in ("1", "True", "true"),
        }
    except (KeyError, TypeError, ValueError):
        return None
    return out if out["shard"].startswith("shard_") and out["shard"].endswith(".npy") else None


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_csv_atomic(path: Path, fields: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())


def read_config(directory) -> dict:
    """The cache's ``cache.json``; a clear error when the folder is not a cache."""
    path = Path(directory) / "cache.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no cache.json (not a clip cache; build one with "
                                f"'python -m EchoFMEngine prepare')")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path}: format {cfg.get('format')!r} is not {FORMAT!r}")
    return cfg


def load_index(directory) -> tuple[list[dict], dict[str, int]]:
    """(clip rows, {source: n_clips}) keeping only complete, consistent entries."""
    directory = Path(directory)
    done = {}
    for r in _read_csv(directory / "done.csv"):
        try:
            done[str(r["source"])] = int(r["n_clips"])
        except (KeyError, TypeError, ValueError):
            continue
    rows = [p for p in map(_parse_index_row, _read_csv(directory / "index.csv")) if p is not None]
    rows = [r for r in rows if r["source"] in done and (directory / r["shard"]).exists()]
    # A source counts as done only when all of its clips are present.
    have: dict[str, int] = {}
    for r in rows:
        have[r["source"]] = have.get(r["source"], 0) + 1
    complete = {s: n for s, n in done.items() if have.get(s, 0) == n}
    rows = [r for r in rows if r["source"] in complete]
    return rows, complete


class CacheWriter:
    """Appends clips to a cache folder shard by shard; resumes a folder written before."""

    def __init__(self, directory, frames: int, size: int, shard_clips: int = 64):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.frames, self.size, self.shard_clips = int(frames), int(size), max(1, int(shard_clips))
        cfg_path = self.dir / "cache.json"
        if cfg_path.exists():
            cfg = read_config(self.dir)
            if (cfg["frames"], cfg["size"]) != (self.frames, self.size):
                raise ValueError(f"{self.dir}: existing cache holds {cfg['frames']} frames x {cfg['size']} px, "
                                 f"not {self.frames} x {self.size}; use another --out folder")
        else:
            cfg = {"format": FORMAT, "version": VERSION, "frames": self.frames, "size": self.size,
                   "channels": 3, "dtype": "uint8", "layout": "N,T,H,W,C"}
            tmp = cfg_path.with_name("cache.json.tmp")
            tmp.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
            os.replace(tmp, cfg_path)
        self._recover()
        self._clips: list[np.ndarray] = []
        self._rows: list[dict] = []
        self._done: list[dict] = []

    def _recover(self) -> None:
        """Drop torn rows, unreferenced shards and temp files left by an interrupted run."""
        rows, done = load_index(self.dir)
        used = {r["shard"] for r in rows}
        for p in self.dir.glob("shard_*.npy*"):
            if p.name.endswith(".tmp") or p.name not in used:
                p.unlink()
        for name in ("index.csv.tmp", "done.csv.tmp"):
            (self.dir / name).unlink(missing_ok=True)
        _write_csv_atomic(self.dir / "index.csv", INDEX_FIELDS,
                          [{**r, "full_cycle": int(r["full_cycle"])} for r in rows])
        _write_csv_atomic(self.dir / "done.csv", DONE_FIELDS,
                          [{"source": s, "n_clips": n} for s, n in done.items()])
        self.done: dict[str, int] = done
        self.n_clips = len(rows)
        self._next_shard = 1 + max((int(s[len("shard_"):-len(".npy")]) for s in used), default=-1)

    @property
    def queued(self) -> int:
        """Clips added but not yet written to a shard."""
        return len(self._rows)

    def add(self, source: str, clips: np.ndarray, rows: list[dict]) -> None:
        """Queue one source's clips (uint8 [n, T, S, S, 3]) with one index row each (n may be 0)."""
        clips = np.asarray(clips)
        if clips.shape[1:] != (self.frames, self.size, self.size, 3) and len(clips):
            raise ValueError(f"{source}: clips of shape {clips.shape[1:]}, cache wants "
                             f"{(self.frames, self.size, self.size, 3)}")
        if clips.dtype != np.uint8:
            raise ValueError(f"{source}: clips must be uint8, got {clips.dtype}")
        if len(rows) != len(clips):
            raise ValueError(f"{source}: {len(clips)} clips but {len(rows)} index rows")
        if len(clips):
            self._clips.append(clips)
            self._rows.extend({**r, "source": source} for r in rows)
        self._done.append({"source": source, "n_clips": len(clips)})
        if len(self._rows) >= self.shard_clips:
            self.flush()

    def flush(self) -> None:
        """Write the queued clips as one shard (temp file + rename), then their index and done rows."""
        rows = []
        if self._clips:
            name = shard_name(self._next_shard)
            n = sum(len(c) for c in self._clips)
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=self.dir)
            os.close(fd)
            try:
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                               shape=(n, self.frames, self.size, self.size, 3))
                at = 0
                for c in self._clips:
                    mm[at:at + len(c)] = c
                    at += len(c)
                mm.flush()
                del mm
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, self.dir / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            rows = [{**r, "shard": name, "offset": i, "full_cycle": int(bool(r["full_cycle"]))}
                    for i, r in enumerate(self._rows)]
            self._next_shard += 1
        if rows:
            _append_csv(self.dir / "index.csv", INDEX_FIELDS, [{k: r[k] for k in INDEX_FIELDS} for r in rows])
        if self._done:
            _append_csv(self.dir / "done.csv", DONE_FIELDS, self._done)
        for d in self._done:
            self.done[d["source"]] = d["n_clips"]
        self.n_clips += len(rows)
        self._clips, self._rows, self._done = [], [], []

    def write_failed(self, failed: list[tuple[str, str]]) -> None:
        """Replace ``failed.csv`` with this run's (source, reason) list."""
        _write_csv_atomic(self.dir / "failed.csv", FAILED_FIELDS,
                          [{"source": s, "reason": r} for s, r in failed])

    def close(self) -> None:
        self.flush()


class ClipCache(Dataset):
    """Clips of a prepared cache, memory-mapped: item ``video`` float [3, T, S, S] in [0, 1] plus ``meta``.

    ``uint8=True`` returns ``video`` as uint8 [3, T, S, S] instead (4x less to move; scale
    by 1/255 on the GPU).
    """

    def __init__(self, directory, transform: Optional[Callable[[dict], dict]] = None, uint8: bool = False):
        self.dir = Path(directory)
        self.uint8 = bool(uint8)
        cfg = read_config(self.dir)
        self.frames, self.size = int(cfg["frames"]), int(cfg["size"])
        self.rows, self.sources = load_index(self.dir)
        if not self.rows:
            raise ValueError(f"{self.dir}: the cache holds no clips")
        self.transform = transform
        self._maps: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are reopened in each worker
        return state

    def shard(self, name: str) -> np.ndarray:
        """The memory-mapped shard array (opened once per process)."""
        mm = self._maps.get(name)
        if mm is None:
            path = self.dir / name
            try:
                mm = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: unreadable cache shard ({exc})") from exc
            if mm.ndim != 5 or mm.shape[1:] != (self.frames, self.size, self.size, 3) or mm.dtype != np.uint8:
                raise ValueError(f"{path}: shard of {mm.dtype} {mm.shape} does not match "
                                 f"[N, {self.frames}, {self.size}, {self.size}, 3] uint8")
            self._maps[name] = mm
        return mm

    def clip_uint8(self, i: int) -> np.ndarray:
        """Clip ``i`` as stored: uint8 [T, S, S, 3]."""
        r = self.rows[i]
        mm = self.shard(r["shard"])
        if r["offset"] >= len(mm):
            raise IndexError(f"{self.dir / r['shard']}: offset {r['offset']} beyond {len(mm)} clips")
        return np.asarray(mm[r["offset"]])

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        # Channels first while still uint8 (cheap), then one fused convert-and-scale pass.
        clip = torch.from_numpy(np.ascontiguousarray(self.clip_uint8(i).transpose(3, 0, 1, 2)))
        video = clip if self.uint8 else clip.div(255.0)
        item = {"video": video,
                "meta": {"path": r["source"], "start_frame": r["start_frame"], "end_frame": r["end_frame"],
                         "fps": r["fps"], "full_cycle": r["full_cycle"], "shard": r["shard"],
                         "offset": r["offset"]}}
        return self.transform(item) if self.transform is not None else item


def _random_cache(directory: Path, n_clips: int, frames: int, size: int, seed: int = 0) -> None:
    """Fill ``directory`` with random clips (for benchmarking only)."""
    rng = np.random.default_rng(seed)
    w = CacheWriter(directory, frames, size, shard_clips=16)
    for i in range(n_clips):
        clip = rng.integers(0, 256, size=(1, frames, size, size, 3), dtype=np.uint8)
        w.add(f"bench/clip_{i:05d}", clip, [{"start_frame": 0, "end_frame": frames, "fps": 50.0,
                                             "full_cycle": True}])
    w.close()


def bench_cache(directory=None, n_clips: int = 32, frames: int = 32, size: int = 224,
                batch_size: int = 8, num_workers: int = 0, max_clips: Optional[int] = None,
                uint8: bool = False) -> float:
    """Frames per second read from a cache through a DataLoader (uint8 mmap -> float [B, 3, T, S, S]).

    ``directory``: an existing cache is read as is; an empty/new folder (or None: a temporary
    one) is first filled with ``n_clips`` random clips of ``frames`` x ``size``. ``uint8``:
    batches stay uint8 (the float conversion left to the GPU).
    """
    def run(path: Path) -> float:
        ds = ClipCache(path, uint8=uint8)
        if max_clips is not None:
            ds = Subset(ds, range(min(max_clips, len(ds))))
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False)
        n_frames = 0
        t0 = time.perf_counter()
        for batch in loader:
            n_frames += batch["video"].shape[0] * batch["video"].shape[2]
        return n_frames / max(time.perf_counter() - t0, 1e-9)

    if directory is not None and (Path(directory) / "cache.json").exists():
        return run(Path(directory))
    if directory is not None:
        _random_cache(Path(directory), n_clips, frames, size)
        return run(Path(directory))
    with tempfile.TemporaryDirectory(prefix="echofm_bench_cache_") as tmp:
        _random_cache(Path(tmp), n_clips, frames, size)
        return run(Path(tmp))


def bench_io_format():
    """The clip cache as a column of ``python -m EchoFMEngine bench io``: (name, write, read).

    ``write(frames [T, H, W, 3] uint8, fps, folder)`` stores the frames as one clip (padded
    square) in a new cache and returns its shard file; ``read(shard)`` opens that cache,
    reads every clip back as float and returns the number of frames.
    """

    def write(frames: np.ndarray, fps: float, folder) -> Path:
        f = np.asarray(frames, dtype=np.uint8)
        t, h, w = f.shape[:3]
        side = max(h, w)
        clip = np.zeros((1, t, side, side, 3), np.uint8)
        clip[0, :, :h, :w] = f
        path = Path(folder) / "clip_cache"
        wr = CacheWriter(path, t, side, shard_clips=1)
        wr.add("bench/clip", clip, [{"start_frame": 0, "end_frame": t, "fps": float(fps), "full_cycle": False}])
        wr.close()
        return path / shard_name(0)  # the shard file, so the benchmark can report its size

    def read(path) -> int:
        ds = ClipCache(Path(path).parent)
        return sum(int(ds[i]["video"].shape[1]) for i in range(len(ds)))

    return "clip cache (npy mmap)", write, read
