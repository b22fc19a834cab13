"""The newest-frame reader of live sources (capture cards, network streams): a thread decodes frames as they
arrive and keeps only the newest, with the time it arrived, so the capture loop never works on a stale
frame and a slow pipeline never backs up a driver's or a socket's buffers. When the stream drops or stalls
it reconnects with backoff, for as long as the run lasts: a blinking network never ends a run."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import av

from .base import SourceFrame

log = logging.getLogger("sweepstream")

BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)  # waits before successive reconnection attempts (the last repeats)
JOIN_S = 3.0

# Opens the device or stream: a context that closes it, and the frames it decodes (ndarray, pts s).
Opener = Callable[[], tuple[AbstractContextManager, Iterator[tuple[object, float | None]]]]


class NewestFrameReader:
    """Reads `open_frames()` on a thread; `take(timeout)` gives the newest frame not yet taken.

    Counters (read by the capture stage): `overwritten` frames replaced before they were taken,
    `reconnects` times the source was lost, `reconnected` times it came back (reconnecting while
    `reconnects > reconnected`), and `outage_s`, the last loss-to-first-frame time."""

    def __init__(self, name: str, open_frames: Opener, *, reconnect: bool) -> None:
        self.name = name
        self._open = open_frames
        self._reconnect = reconnect
        self._newest: SourceFrame | None = None
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._container: AbstractContextManager | None = None
        self.overwritten = 0
        self.reconnects = 0
        self.reconnected = 0
        self.outage_s: float | None = None
        self.ended = False
        self.error: str | None = None
        self._index = 0
        self._thread = threading.Thread(target=self._run, name=f"reader {name}", daemon=True)

    def start(self, first: tuple[AbstractContextManager, Iterator] | None = None) -> None:
        """Start reading; `first` is an already opened source (opened before the stages start, so a
        missing device or unreachable URL is one clear error then)."""
        self._first = first
        self._thread.start()

    @property
    def reconnecting(self) -> bool:
        return self.reconnects > self.reconnected

    def take(self, timeout: float) -> SourceFrame | None:
        """The newest frame not yet taken, waiting at most `timeout` s for one."""
        with self._ready:
            if self._newest is None and not self.ended:
                self._ready.wait(timeout)
            frame, self._newest = self._newest, None
            return frame

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(JOIN_S)

    def _run(self) -> None:
        opened, lost_at, attempt = self._first, None, 0
        while not self._stop.is_set():
            if opened is None:
                try:
                    opened = self._open()
                except (av.FFmpegError, OSError) as exc:
                    log.debug("source %s: reconnect attempt %d failed: %s", self.name, attempt + 1, exc)
                    self._stop.wait(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                    attempt += 1
                    continue
            container, frames = opened
            got_frame = self._read(container, frames, lost_at)
            if got_frame:
                lost_at, attempt = None, 0
            opened = None
            if self._stop.is_set():
                break
            if not self._reconnect:
                break
            if lost_at is None:
                lost_at = time.monotonic()
                self.reconnects += 1
                log.warning("source %s: stream lost; reconnecting", self.name)
        with self._ready:
            self.ended = True
            self._ready.notify_all()

    def _read(self, container: AbstractContextManager, frames: Iterator, lost_at: float | None) -> bool:
        """Pull frames until the source ends, fails or the reader stops; whether any frame came."""
        got = False
        try:
            with container:
                for image, pts in frames:
                    t_arrival = time.monotonic_ns()
                    if not got and lost_at is not None:
                        self.reconnected += 1
                        self.outage_s = time.monotonic() - lost_at
                        log.warning("source %s: reconnected after %.2f s", self.name, self.outage_s)
                    got = True
                    self._publish(SourceFrame(image, self._index, pts, t_arrival=t_arrival))
                    self._index += 1
                    if self._stop.is_set():
                        break
        except (av.FFmpegError, OSError) as exc:
            self.error = str(exc)
            log.debug("source %s: read failed: %s", self.name, exc)
        return got

    def _publish(self, frame: SourceFrame) -> None:
        with self._ready:
            if self._newest is not None:
                self.overwritten += 1
            self._newest = frame
            self._ready.notify()
