"""Run long work (analysis, training, imports) in a separate process without freezing Slicer.

:class:`BackgroundProcess` is Qt-free: it starts a real subprocess in its own process group,
reads stdout/stderr on two threads, and hands out :class:`Event` objects from :meth:`poll`,
which the module's widget calls from a ``qt.QTimer`` (tests and the console call it in a loop).
Progress comes from ``PROGRESS k/n message`` lines (what ``python -m EchoFMEngine analyze``
prints), tqdm bars (``45%|###   | 45/100``) and ``step k/n`` / ``epoch k/n`` log lines.
:meth:`cancel` kills the whole process tree.
"""
from __future__ import annotations

import collections
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ERROR_LINES = 12          # how many trailing stderr lines make up error_message
DRAIN_S = 2.0             # after the process exits, wait this long at most for its pipes to close

_PROGRESS = re.compile(r"^\s*PROGRESS\s+(\d+)\s*/\s*(\d+)\s*(.*?)\s*$")
_TQDM = re.compile(r"^(.*?)\s*\d{1,3}%\|.*?\|\s*(\d+)\s*/\s*(\d+)")
_STEP = re.compile(r"\b(?:step|epoch|iter|iteration|batch|clip|study|frame)\s+(\d+)\s*/\s*(\d+)", re.I)
_BARE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)(?:\s+(.*?))?\s*$")


class ProcessStartError(RuntimeError):
    """The command could not be started at all (program not found, not executable, bad folder)."""


@dataclass
class Event:
    """One thing the process said: ``kind`` is "progress", "stdout", "stderr" or "finished".

    ``fraction`` (0..1) and ``done``/``total`` are set for progress events; ``text`` is the
    message (for "finished": a one-line outcome)."""

    kind: str
    text: str
    fraction: Optional[float] = None
    done: Optional[int] = None
    total: Optional[int] = None


def parse_progress(line: str) -> Optional[Event]:
    """A progress :class:`Event` when ``line`` reports ``k/n`` progress, else None.

    Recognised: ``PROGRESS k/n message``, tqdm bars (``desc: 45%|##  | 45/100 [...]``), log lines
    containing ``step k/n`` (also epoch/iter/batch/clip/study/frame), and lines starting with ``k/n``.
    A count larger than its total, or a zero total, is not progress."""
    for pattern, msg_of in ((_PROGRESS, lambda m: m.group(3)),
                            (_TQDM, lambda m: m.group(1).strip().rstrip(":")),
                            (_STEP, lambda m: line.strip()),
                            (_BARE, lambda m: (m.group(3) or "").strip())):
        m = pattern.search(line)
        if not m:
            continue
        if pattern is _TQDM:
            done, total = int(m.group(2)), int(m.group(3))
        else:
            done, total = int(m.group(1)), int(m.group(2))
        if total <= 0 or done > total:
            continue
        return Event("progress", msg_of(m), fraction=done / total, done=done, total=total)
    return None


def inside_slicer() -> bool:
    """True in the Python of the Slicer application (where ``slicer.app`` exists)."""
    slicer = sys.modules.get("slicer")
    return slicer is not None and hasattr(slicer, "app")


def python_command(executable: Optional[str] = None, in_slicer: Optional[bool] = None) -> list[str]:
    """The interpreter that runs the engine's CLI in a child process, as an argv prefix.

    Inside Slicer ``sys.executable`` is the application, so the child must be ``PythonSlicer``
    (next to it, or on PATH); elsewhere it is ``sys.executable`` itself."""
    executable = executable or sys.executable
    in_slicer = inside_slicer() if in_slicer is None else in_slicer
    if not in_slicer:
        return [executable]
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    beside = Path(executable).resolve().parent / name
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("PythonSlicer")
    if found:
        return [found]
    raise ProcessStartError(f"cannot find {name} next to {executable} or on PATH; the engine's command "
                            f"line needs Slicer's own Python launcher")


def engine_environment(extra_paths: Sequence[str] = (), env: Optional[dict] = None) -> dict:
    """A child environment that finds ``EchoFMEngine`` (``extra_paths`` first on PYTHONPATH) and
    writes unbuffered, so progress lines arrive as they are printed."""
    env = dict(os.environ if env is None else env)
    paths = [str(p) for p in extra_paths if p]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pump(stream, kind: str, out: "queue.Queue") -> None:
    """Read a pipe in chunks and queue its lines; ``\\r`` ends a line too (tqdm redraws with it)."""
    pending = b""
    try:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                break
            pending += chunk
            parts = re.split(rb"\r\n|\r|\n", pending)
            pending = parts.pop()
            for p in parts:
                out.put((kind, p.decode("utf-8", "replace")))
    except (OSError, ValueError):
        pass            # pipe closed under us (cancel): nothing more to read
    finally:
        if pending:
            out.put((kind, pending.decode("utf-8", "replace")))
        out.put((kind, None))   # end of this stream


class BackgroundProcess:
    """One command in a child process: :meth:`start`, then :meth:`poll` until :attr:`finished`.

    ``cmd`` is an argv list (never a shell string); ``name`` is how messages call the job. After
    the end, :attr:`returncode` holds the exit status (negative: killed by that signal on POSIX),
    :attr:`cancelled` says whether :meth:`cancel` ended it, and :attr:`error_message` explains a
    failure with the last lines the process wrote to stderr."""

    def __init__(self, cmd: Sequence[str], cwd=None, env: Optional[dict] = None, name: Optional[str] = None):
        if isinstance(cmd, (str, bytes)) or not cmd:
            raise ValueError("cmd must be a non-empty list of arguments, not a shell string")
        self.cmd = [str(c) for c in cmd]
        self.name = name or Path(self.cmd[0]).name      # how messages call this job
        self.cwd = None if cwd is None else str(cwd)
        self.env = env
        self.returncode: Optional[int] = None
        self.cancelled = False
        self.error_message = ""
        self.progress: Optional[Event] = None          # the latest progress event
        self._proc: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue" = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._open_streams = 0
        self._exited_at: Optional[float] = None
        self._stderr_tail: collections.deque = collections.deque(maxlen=ERROR_LINES)
        self._stdout_tail: collections.deque = collections.deque(maxlen=ERROR_LINES)
        self._pending: list[Event] = []
        self._finished = False

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._finished

    @property
    def finished(self) -> bool:
        """True once the process has exited and everything it wrote has been read."""
        if not self._finished and self._proc is not None:
            self._collect()
        return self._finished

    # ------------------------------------------------------------------ control
    def start(self) -> "BackgroundProcess":
        """Start the process; raises :class:`ProcessStartError` with a clear message when it cannot."""
        if self._proc is not None:
            raise RuntimeError("this process was already started")
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True       # own process group: cancel() reaches grandchildren
        try:
            self._proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
        except FileNotFoundError as e:
            where = self.cwd if (self.cwd and not Path(self.cwd).is_dir()) else None
            reason = (f"working folder {where} does not exist" if where
                      else f"no such program: {self.cmd[0]}")
            self._fail_to_start(f"cannot start {self.cmd[0]!r}: {reason} ({e.strerror})")
        except (PermissionError, OSError) as e:
            self._fail_to_start(f"cannot start {self.cmd[0]!r}: {e.strerror or e}")
        for stream, kind in ((self._proc.stdout, "stdout"), (self._proc.stderr, "stderr")):
            t = threading.Thread(target=_pump, args=(stream, kind, self._queue), daemon=True,
                                 name=f"echofm-{kind}-reader")
            t.start()
            self._threads.append(t)
        self._open_streams = 2
        return self

    def _fail_to_start(self, message: str):
        self.error_message = message
        self._finished = True
        raise ProcessStartError(message)

    def cancel(self, grace_s: float = 3.0) -> None:
        """Stop the process and every process it started; waits up to ``grace_s`` before SIGKILL."""
        if self._proc is None or self._finished:
            return
        self.cancelled = True
        pid = self._proc.pid
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        else:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self._proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(pid, signal.SIGKILL)        # the leader may be gone, its children not
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self._proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until the process ended and its output was read (for scripts and tests; the
        widget polls instead). Returns the exit status, or None on timeout."""
        if self._proc is None:
            raise RuntimeError("start() the process first")
        end = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if end is not None and time.monotonic() > end:
                return None
            time.sleep(0.02)
        return self.returncode

    # ------------------------------------------------------------------ output
    def poll(self) -> list[Event]:
        """Everything the process said since the last call, in order; the last event of a run
        has kind "finished". Never blocks."""
        if self._proc is None:
            return []
        self._collect()
        events, self._pending = self._pending, []
        return events

    def _collect(self) -> None:
        """Move queued lines into pending events; notice the end once both pipes closed."""
        if self._finished:
            return
        while True:
            try:
                kind, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open_streams -= 1
                continue
            if not line.strip():
                continue
            prog = parse_progress(line)
            if prog is not None:
                self.progress = prog
                self._pending.append(prog)
                continue
            (self._stderr_tail if kind == "stderr" else self._stdout_tail).append(line.rstrip())
            self._pending.append(Event(kind, line.rstrip()))
        if self._finished or self._proc.poll() is None:
            return
        if self._exited_at is None:
            self._exited_at = time.monotonic()
        # Normally both pipes close with the process. A grandchild that left the process group
        # (its own session) may hold them open: do not wait for it forever.
        if self._open_streams == 0 or time.monotonic() - self._exited_at > DRAIN_S:
            self._finish()

    def _finish(self) -> None:
        for t in self._threads:
            t.join(timeout=0.1)
        self.returncode = self._proc.returncode
        self._finished = True
        if self.cancelled:
            self.error_message = "cancelled by the user"
            text = "cancelled"
        elif self.returncode == 0:
            text = "finished"
        else:
            tail = list(self._stderr_tail) or list(self._stdout_tail)
            how = (f"was killed by signal {-self.returncode}" if self.returncode < 0
                   else f"failed with exit code {self.returncode}")
            self.error_message = f"{self.name} {how}" + (":\n" + "\n".join(tail) if tail else
                                                                        " and wrote no error message")
            text = self.error_message
        self._pending.append(Event("finished", text))
