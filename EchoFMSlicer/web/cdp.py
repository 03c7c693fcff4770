"""A small Chrome DevTools Protocol driver on aiohttp's websocket client (web benchmark and e2e tests).

Starts headless Chromium on a free port, opens one page, and offers evaluate / click / mouse drag /
keys / screenshot, each a plain CDP command (Runtime.evaluate, Input.dispatchMouseEvent,
Input.dispatchKeyEvent, Page.captureScreenshot). Clicks and keys are real input events, as a
person's: they go through the browser's hit testing and focus, not through element.click().
"""
from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import time
import urllib.request

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,900"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chromium:
    """One headless Chromium with one page, driven over CDP (use in an asyncio loop)."""

    def __init__(self, executable: str, user_data_dir: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([executable, *FLAGS, f"--remote-debugging-port={self.port}",
                                      f"--user-data-dir={user_data_dir}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._id = 0
        self.ws = self.session = None

    async def connect(self, timeout: float = 90.0) -> None:
        """Wait for the DevTools port (a first start on a busy disk took over 30 s) and open the page."""
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                    pages = [p for p in json.load(r) if p.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"Chromium exited (code {self.proc.returncode}) before opening its DevTools port")
            if time.time() > deadline:
                raise RuntimeError(f"Chromium did not open its DevTools port in {timeout:.0f} s")
            await asyncio.sleep(0.2)
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1,
                        mobile=False)

    async def send(self, method: str, **params):
        self._id += 1
        my = self._id
        await self.ws.send_str(json.dumps({"id": my, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=60)).data)
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def js(self, expression: str):
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0, what: str = ""):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = await self.js(expression)
            if v:
                return v
            await asyncio.sleep(0.1)
        error = await self.js("(document.querySelector('#error') || {}).innerText || ''")
        raise TimeoutError(f"timed out waiting for {what or expression}; page error: {error!r}")

    async def box(self, selector: str) -> list:
        """[x, y, width, height] of the element in the viewport (scrolled into view first)."""
        r = await self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                          f" if (!e) return null; e.scrollIntoView({{block: 'center'}});"
                          f" const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }})()")
        if not r:
            raise RuntimeError(f"no element {selector}")
        return r

    async def click(self, selector: str, at: float = 0.5) -> None:
        """A real left click at the element's centre (``at``: fraction of its width from the left)."""
        x, y, w, h = await self.box(selector)
        await self.click_at(x + w * at, y + h / 2)

    async def click_at(self, x: float, y: float) -> None:
        await self.mouse("mouseMoved", x, y, buttons=0)
        await self.mouse("mousePressed", x, y)
        await self.mouse("mouseReleased", x, y, buttons=0)

    async def key(self, key: str, code: str, vk: int, modifiers: int = 0) -> None:
        """Press and release one key (``modifiers``: 2 Ctrl, 8 Shift, as CDP counts them)."""
        for kind in ("rawKeyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=vk,
                            nativeVirtualKeyCode=vk, modifiers=modifiers)

    async def mouse(self, kind: str, x: float, y: float, buttons: int = 1) -> None:
        await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                        buttons=buttons, clickCount=1)

    async def drag(self, points) -> None:
        (x0, y0), rest = points[0], points[1:]
        await self.mouse("mouseMoved", x0, y0, buttons=0)
        await self.mouse("mousePressed", x0, y0)
        for x, y in rest:
            await asyncio.sleep(0.03)
            await self.mouse("mouseMoved", x, y)
        await self.mouse("mouseReleased", *rest[-1], buttons=0)

    async def screenshot(self, path) -> bytes:
        data = base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
        with open(path, "wb") as f:
            f.write(data)
        return data

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
