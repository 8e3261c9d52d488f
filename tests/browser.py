"""Headless Chromium driven over the DevTools protocol (Debian's `chromium`; aiohttp for the websocket): open a
page, wait until a script says it is ready, click, read the text, take a screenshot. Only 127.0.0.1 pages."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, width: int = 1600, height: int = 1000):
        self.size = (width, height)
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        if CHROMIUM is None:
            raise RuntimeError("chromium is not installed: the README's test command installs Debian's chromium")
        self._profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)  # chromium may still write there
        self._proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self._profile.name}", f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        self._port = int(port_file.read_text().split()[0])
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._connect())
        return self

    def __exit__(self, *exc) -> None:
        self._loop.run_until_complete(self._close())
        self._loop.close()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._profile.cleanup()

    async def _connect(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{self._port}/json") as response:
            pages = [t for t in await response.json() if t["type"] == "page"]
        self._ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)

    async def _close(self) -> None:
        await self._ws.close()
        await self._session.close()

    async def _call(self, method: str, **params) -> dict:
        call_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self._ws.receive(timeout=60)).data)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def call(self, method: str, **params) -> dict:
        """One DevTools protocol command, e.g. call("Page.navigate", url=...)."""
        return self._loop.run_until_complete(self._call(method, **params))

    def evaluate(self, script: str):
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def open(self, url: str) -> None:
        assert url.startswith("http://127.0.0.1:"), url
        self.call("Page.navigate", url=url)

    def wait_for(self, script: str, timeout_s: float = 60) -> None:
        """Until the expression is truthy (the page has rendered what the test needs), or fail."""
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(f"!!({script})"):
            if time.monotonic() > deadline:
                raise AssertionError(f"page never satisfied {script!r}; it shows: {self.text()[:2000]}")
            time.sleep(0.5)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
