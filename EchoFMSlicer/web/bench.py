"""Benchmark of the web front end in a real browser: start-up to the first image, frame-change re-render.

``python -m EchoFMSlicer.web --bench [PATH]`` starts ``python -m EchoFMSlicer.web PATH`` on a free
loopback port and headless Chromium (driven over the DevTools protocol, ``cdp.py``), and reports:
seconds from the server's process start to the first slice image drawn in the page, and for frame
changes the server's go-to-frame + render time and the time until the page shows the new image.
The e2e tests share the server and page helpers below.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cdp import Chromium, free_port

REPO = Path(__file__).resolve().parents[2]

# [x, y, w, h] of the slice view's image once it has pixels (trame-rca draws into an <img>), else null
VIEW_IMAGE_JS = ("(() => { const v = document.querySelector('#view'); if (!v) return null;"
                 " const e = [...v.querySelectorAll('img,canvas')].find(e => e.clientWidth > 100 &&"
                 " (e.tagName != 'IMG' || (e.complete && e.naturalWidth > 0)));"
                 " if (!e) return null; const r = e.getBoundingClientRect();"
                 " return [r.x, r.y, r.width, r.height]; })()")
CINE_SHOWN_JS = ("!!document.querySelector('#info') && document.querySelector('#info').innerText.includes('frames')")
# set the frame from the page and resolve with the ms until the view's image changes (null: no change in 5 s)
FRAME_CHANGE_JS = """(async (frame) => {
  const img = () => [...document.querySelectorAll('#view img')].find(e => e.clientWidth > 100);
  const before = img() && img().src, t0 = performance.now();
  window.trame.state.set('frame', frame);
  while (performance.now() - t0 < 5000) {
    await new Promise(r => setTimeout(r, 2));
    const e = img();
    if (e && e.src !== before && e.complete) return performance.now() - t0;
  }
  return null; })"""


def chromium_path():
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Server:
    """``python -m EchoFMSlicer.web ARGS`` as a child process, its output in ``log``."""

    def __init__(self, args, log: Path, port: int) -> None:
        self.log, self.port = Path(log), port
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "EchoFMSlicer.web", *map(str, args), "--port", str(port)],
                                     cwd=REPO, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    async def serving(self, timeout: float = 120.0) -> None:
        """Wait for the "serving on" line; a server that exits first raises with the end of its log."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.log.read_text()[-2000:])
            if "serving on" in self.log.read_text():
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the server did not start in {timeout:.0f} s: " + self.log.read_text()[-2000:])

    def cpu_s(self):
        """CPU seconds (user + system) the server has used so far; None off Linux. Unlike wall time it
        hardly depends on what else the machine runs."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def first_image(page, url: str, timeout: float = 90.0) -> list:
    """Open ``url`` and wait for the cine's description and a slice image with pixels; returns its box."""
    await page.goto(url)
    await page.wait_for(CINE_SHOWN_JS, timeout, "the cine description")
    return await page.wait_for(VIEW_IMAGE_JS, timeout, "a rendered slice view image")


async def frame_changes(page, frames) -> tuple:
    """(page ms, server ms) per frame change: until the new image is shown / go_to_frame + render."""
    shown, server = [], []
    for f in frames:
        ms = await page.js(f"{FRAME_CHANGE_JS}({int(f)})")
        if ms is not None:
            shown.append(ms)
        server.append(float(await page.js("window.trame.state.get('last_render_ms')")))
    return shown, server


def _summary(values) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {"median": round(statistics.median(v), 1), "p90": round(v[int(0.9 * (len(v) - 1))], 1),
            "max": round(v[-1], 1), "n": len(v)}


async def _bench(path: str, n_frames: int, work: Path) -> dict:
    exe = chromium_path()
    if exe is None:
        raise SystemExit("the benchmark needs Chromium (apt-get install chromium)")
    port = free_port()
    # the browser is up first, as a user's would be: the figure is the server's start to its first image
    browser, server = Chromium(exe, str(work / "chrome")), None
    try:
        await browser.connect()
        server = Server([path, "--models", work / "models", "--export", work / "export"], work / "server.log", port)
        await server.serving()
        serving_s = time.perf_counter() - server.started
        await first_image(browser, f"http://127.0.0.1:{port}/")
        first_s, first_cpu = time.perf_counter() - server.started, server.cpu_s()
        n = int(await browser.js("window.trame.state.get('n_frames')"))
        frames = [(7 * i + 3) % n for i in range(n_frames)]
        shown, rendered = await frame_changes(browser, frames)
    finally:
        await browser.close()
        if server is not None:
            server.stop()
    return {"cine": Path(path).suffix, "frames_in_cine": n, "cores": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2), "server_cpu_s_at_first_image": first_cpu,
            "server_serving_s": round(serving_s, 2), "first_image_s": round(first_s, 2),
            "frame_change_shown_ms": _summary(shown), "frame_change_server_ms": _summary(rendered)}


def main(path: str, n_frames: int = 30) -> int:
    """Run the benchmark on ``path`` and print its numbers as JSON (one line)."""
    with tempfile.TemporaryDirectory(prefix="echofm-web-bench-") as tmp:
        out = asyncio.run(_bench(path, n_frames, Path(tmp)))
    print(json.dumps(out))
    return 0
