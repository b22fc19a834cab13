"""The pipeline run as a command with its viewer on, and the page opened in a real headless browser (the
system's Chromium driven by Playwright; Playwright's own browser downloads are never used). Shared by the
viewer's browser test and `sweepstream-bench-viewer`."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
URL_LINE = re.compile(r"^viewer: (http://\S+)$")


def find_chromium() -> str | None:
    """The system browser's path, or None."""
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


class PipelineRun:
    """`run_stream.py ARGS` in the background, its stderr collected line by line (the viewer's URL is one)."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen([sys.executable, str(REPO / "run_stream.py"), *args], cwd=REPO,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, pattern: re.Pattern, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if (found := pattern.match(line)) is not None:
                    return found
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise RuntimeError(f"pipeline: no line matching {pattern.pattern!r}; its stderr:\n" +
                           "\n".join(self.lines[-40:]))

    def url(self, timeout_s: float = 120) -> str:
        return self.wait_for_line(URL_LINE, timeout_s).group(1)

    def interrupt(self, timeout_s: float = 30) -> int:
        """Ctrl-C (ends a lingering viewer, or the run), then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout_s)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def open_page(url: str, executable: str, size: tuple[int, int] = (1400, 1100)) -> Iterator[Any]:
    """A headless Chromium page at `url` (Playwright's sync API)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            page.goto(url)
            yield page
        finally:
            browser.close()


def preview_latency(page: Any) -> dict[str, Any]:
    """The previews the page drew (count) and their latency in ms (p50, p95, max of the last 300): from
    capture to drawn (`capture`), and from the viewer's send to drawn (`transport`, the WebSocket's part)."""
    out: dict[str, Any] = {"count": page.evaluate("window.viewerStats.previews")}
    for name, key in (("capture", "latencies"), ("transport", "transport")):
        values = sorted(page.evaluate(f"window.viewerStats.{key}"))
        if values:
            out[name] = {"p50": round(values[len(values) // 2], 1),
                         "p95": round(values[min(len(values) - 1, int(0.95 * len(values)))], 1),
                         "max": round(values[-1], 1)}
    return out
