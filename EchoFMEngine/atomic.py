"""Writes that never leave a half file, and one writer per output folder.

* :func:`atomic_path` / :func:`atomic_write_text` / :func:`atomic_write_bytes`: write to a temporary
  name in the same folder, fsync, then ``os.replace`` onto the final name, so a reader (or a kill)
  sees the old file or the new one, never a torn one.
* :class:`RunLock`: ``DIR/.echofm.lock`` holding the owner's pid, host and start time; a second
  writer is refused with a message naming the first; a lock whose process is gone (same host) is
  stale and taken over.
* :func:`remove_stale_temporaries`: temporary files left by a killed writer, removed at start.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, Path]
LOCK_NAME = ".echofm.lock"
# ``.NAME.tmp.PID`` (this module, checkpoints) and ``.NAME.tmp-PID`` (staging folders)
_TMP = re.compile(r"^\..+\.tmp[.-](\d+)$")
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def is_disk_full(e: BaseException) -> bool:
    """True for 'no space left on device' / 'disk quota exceeded'."""
    return isinstance(e, OSError) and e.errno in DISK_FULL


def tmp_name(path: PathLike) -> Path:
    """The temporary sibling of ``path`` this process writes before renaming."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp.{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write (for writers that take a file name: SimpleITK, matplotlib);
    on success it is fsynced and renamed onto ``path``; on any error it is removed."""
    final = Path(path)
    tmp = tmp_name(final)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: PathLike, recursive: bool = False) -> list[Path]:
    """Delete ``.NAME.tmp.PID`` files/folders whose writer process is no longer running."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in (folder.rglob(".*") if recursive else folder.glob(".*")):
        m = _TMP.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped) holds nothing
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    return True


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (Linux), so a reused pid is not taken for the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class LockedError(RuntimeError):
    """The folder is owned by another running process (the message names it)."""


class RunLock:
    """Exclusive ownership of an output folder: ``with RunLock(out, "analyze"): ...``."""

    def __init__(self, folder: PathLike, what: str = "run"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.took_over: Optional[dict] = None
        self._held = False

    def _owner(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}          # torn or foreign: treated as stale below (it names no process)

    def _stale(self, owner: dict) -> bool:
        if not owner or "pid" not in owner:
            return True
        if owner.get("host") != socket.gethostname():
            return False       # cannot check a process on another machine
        pid = int(owner["pid"])
        if not pid_alive(pid):
            return True
        start = owner.get("start_ticks")
        return bool(start) and _start_time(pid) not in (None, start)

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "start_ticks": _start_time(os.getpid())}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue
                if owner.get("pid") == os.getpid() and owner.get("host") == me["host"]:
                    raise LockedError(f"{self.folder} is in use by another {owner.get('what', 'run')} of this "
                                      f"process (pid {os.getpid()} on {me['host']})")
                if not self._stale(owner):
                    raise LockedError(
                        f"{self.folder} is in use by another {owner.get('what', 'run')} (pid {owner.get('pid')} "
                        f"on {owner.get('host')}, started {owner.get('started', '?')}); wait for it or choose "
                        f"another output folder (if that process is gone, delete {self.path})")
                # stale: move it aside atomically so two takers cannot both win
                aside = self.path.with_name(f".{LOCK_NAME.lstrip('.')}.stale.{os.getpid()}")
                try:
                    os.replace(self.path, aside)
                    aside.unlink()
                except FileNotFoundError:
                    pass
                self.took_over = owner
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self._held = True
            return self
        raise LockedError(f"{self.folder}: could not take the lock {self.path}")

    def release(self) -> None:
        if self._held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self._held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class AppendCSV:
    """A CSV file grown one row at a time, each row flushed and fsynced as written.

    A failed write (disk full) is cut back to the last whole row, so the file stays valid."""

    def __init__(self, path: PathLike, columns: list):
        self.path = Path(path)
        self.columns = list(columns)

    def _line(self, values) -> bytes:
        buf = io.StringIO()
        csv.writer(buf).writerow(values)
        return buf.getvalue().encode("utf-8")

    def reset(self, rows: list = ()) -> None:
        """Rewrite the file atomically with the header and ``rows`` (dicts or sequences)."""
        data = self._line(self.columns) + b"".join(self._line(self._values(r)) for r in rows)
        atomic_write_bytes(self.path, data)

    def _values(self, row) -> list:
        return [row.get(c, "") for c in self.columns] if isinstance(row, dict) else list(row)

    def append(self, row) -> None:
        if not self.path.exists():
            self.reset()
        data = self._line(self._values(row))
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            try:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(size)
                raise

    def read(self) -> list[dict]:
        """The whole rows of the file (a torn last line, from a power cut, is dropped)."""
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8", errors="replace")
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        rows = list(csv.DictReader(text.splitlines()))
        return [r for r in rows if None not in r]
