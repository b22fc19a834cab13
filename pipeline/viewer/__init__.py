"""The live web viewer (`run.viewer = HOST:PORT`): a page at `/` and Prometheus metrics at `/metrics`.

It runs on its own thread and asyncio loop in the supervisor's process, beside the supervisor's loop and
off the frame path: it follows the events and previews as a subscriber does, and takes the metrics from
snapshots of the supervisor's telemetry. A bind to anything but a loopback address needs a token, made
here, printed once with the URL, and checked on every request and WebSocket.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

from aiohttp import web

from ..config import DEFAULT_SOURCE, Config, ConfigError, parse_address
from ..prometheus import snapshot
from ..security import ClientKeys, is_loopback
from ..telemetry import Telemetry
from .server import ViewerServer

AUTO_ADDRESS = ("127.0.0.1", 8080)  # where `auto` serves the demo
START_TIMEOUT_S = 10.0
UPDATE_INTERVAL_S = 0.5  # how often the metrics' snapshot is renewed


class Viewer:
    """The server's thread and loop: started before the stages, told where the pipeline's sockets are once
    they are bound, fed the telemetry while the run goes, and stopped after the summary (or kept serving
    the finished run for `run.viewer_linger` seconds)."""

    def __init__(self, host: str, port: int, out: Path) -> None:
        self.host, self.port, self.out = host, port, out
        self.token = None if is_loopback(f"tcp://{_bracketed(host)}:{port}") else secrets.token_urlsafe(18)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: OSError | None = None
        self._next_update = 0.0
        self.server: ViewerServer | None = None
        self._thread = threading.Thread(target=self._run, name="sweepstream-viewer", daemon=True)

    @property
    def url(self) -> str:
        query = "" if self.token is None else f"?token={self.token}"
        return f"http://{_bracketed(self.host)}:{self.port}/{query}"

    def start(self) -> None:
        """Bind the server; OSError (address in use, not this host's) when it cannot."""
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise OSError(f"the server did not start within {START_TIMEOUT_S:g} s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = ViewerServer(self.out, self.token)
        runner = web.AppRunner(self.server.app, access_log=None)
        try:
            self.loop.run_until_complete(runner.setup())
            self.loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
            self.port = runner.addresses[0][1]
        except OSError as exc:
            self._error = exc
        self._ready.set()
        if self._error is None:
            self.loop.run_forever()
        self.loop.run_until_complete(self.server.stop())
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def follow(self, events: str, preview: str | None, control: str | None,
               keys: ClientKeys | None = None) -> None:
        """Where postprocess bound its sockets; `keys`: the console's, in a run with Curve keys."""
        self.loop.call_soon_threadsafe(self.server.follow, events, preview, control, keys)

    def update(self, telemetry: Telemetry, force: bool = False) -> None:
        """A fresh metrics snapshot, at most every UPDATE_INTERVAL_S unless forced (the end of the run)."""
        now = time.monotonic()
        if force or now >= self._next_update:
            self._next_update = now + UPDATE_INTERVAL_S
            self.server.collector.latest = snapshot(telemetry)

    def finish(self, telemetry: Telemetry, linger_s: float) -> None:
        """The run's final figures, then (Ctrl-C or SIGTERM ends it sooner) `linger_s` of serving them,
        then stop. The handlers are its own: a process started with SIGINT ignored (a background job)
        would otherwise linger through a Ctrl-C."""
        self.update(telemetry, force=True)
        if linger_s > 0:
            print(f"viewer: serving the finished run at {self.url} for {linger_s:g} s (Ctrl-C ends it)",
                  file=sys.stderr, flush=True)
            ended = threading.Event()
            previous = {sig: signal.signal(sig, lambda *_: ended.set()) for sig in (signal.SIGINT,
                                                                                       signal.SIGTERM)}
            try:
                ended.wait(linger_s)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(START_TIMEOUT_S)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def open_viewer(config: Config, out: Path) -> Viewer | None:
    """The run's viewer, started, or None when it is off; `run.viewer` is left as the address it serves
    (or None), which tells postprocess to publish previews. An explicit address that cannot be bound is a
    ConfigError; `auto` (the demo on a terminal) only says so and runs without one."""
    setting = config.run.viewer
    if setting == "auto":
        demo = config.source.uri == DEFAULT_SOURCE
        setting = f"{AUTO_ADDRESS[0]}:{AUTO_ADDRESS[1]}" if demo and sys.stderr.isatty() else None
        explicit = False
    else:
        explicit = True
    config.run.viewer = None
    if setting is None:
        return None
    viewer = Viewer(*parse_address(setting), out)
    try:
        viewer.start()
    except OSError as exc:
        viewer.close()
        if explicit:
            raise ConfigError(f"run.viewer: cannot serve on {setting}: {exc.strerror or exc}") from None
        print(f"viewer: off ({setting}: {exc.strerror or exc}; set run.viewer=HOST:PORT)", file=sys.stderr)
        return None
    config.run.viewer = f"{viewer.host}:{viewer.port}"
    print(f"viewer: {viewer.url}", file=sys.stderr, flush=True)
    if viewer.token is not None:
        print("viewer: not a loopback address, so every request needs this token (shown only here)",
              file=sys.stderr, flush=True)
    return viewer
