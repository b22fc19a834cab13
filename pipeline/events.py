"""Event objects: the same JSON goes to the PUB socket (topic = event type) and to the run's journal."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq

log = logging.getLogger("sweepstream")

SCHEMA_VERSION = 1
EVENT_TYPES = ("frame", "sweep_started", "best_frame", "biometry", "sweep_ended", "health",
               "exam_summary")
# Fields every event carries; the README documents each event type's own fields.
COMMON_FIELDS = ("schema", "type", "run_id", "sweep_id", "frame_id", "t_capture", "t_event", "latency_ms")

# Offset from the monotonic clock (what frame headers carry) to wall-clock time on this host.
_WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def wall_time(mono_ns: int) -> float:
    """Unix seconds of a monotonic timestamp taken on this host."""
    return round((mono_ns + _WALL_OFFSET_NS) / 1e9, 6)


def monotonic_ns_of(wall_s: float) -> int:
    """The monotonic timestamp of a wall-clock time taken on this host (the inverse of wall_time)."""
    return int(round(wall_s * 1e9)) - _WALL_OFFSET_NS


def make_event(kind: str, run_id: str, *, sweep_id: int | None = None, frame_id: int | None = None,
               t_capture_ns: int | None = None, latency_ms: float | None = None, **fields: Any) -> dict:
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}")
    return {"schema": SCHEMA_VERSION, "type": kind, "run_id": run_id, "sweep_id": sweep_id,
            "frame_id": frame_id, "t_capture": None if t_capture_ns is None else wall_time(t_capture_ns),
            "t_event": round(time.time(), 6),
            "latency_ms": None if latency_ms is None else round(latency_ms, 3), **fields}


FSYNC_INTERVAL_S = 1.0  # postprocess.fsync = interval: at most this much of the journal is at risk


class Journal:
    """Append-only JSONL. Each event is flushed to the kernel at once (a crash of the process loses
    nothing), and fsync'd to the disk per event, at most FSYNC_INTERVAL_S apart, or never (`fsync`), for
    what a power cut may take."""

    def __init__(self, path: Path, fsync: str = "event") -> None:
        self.path = path
        self.fsync = fsync
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the stage
        self._synced = time.monotonic()

    def write(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()
        now = time.monotonic()
        if self.fsync == "event" or (self.fsync == "interval" and now - self._synced >= FSYNC_INTERVAL_S):
            os.fsync(self._file.fileno())
            self._synced = now

    def close(self) -> None:
        if not self._file.closed:
            try:
                if self.fsync != "off":
                    self._file.flush()
                    os.fsync(self._file.fileno())
            finally:
                self._file.close()


def iter_journal(path: Path) -> Iterator[dict]:
    """A run's events, one at a time (a long run's journal is large). A torn last line (the writer died
    mid-line) is left out, as is anything after a line that does not parse: every reader of journals in
    the project reads them through here."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                return
            if isinstance(event, dict):
                yield event


def read_journal(path: Path) -> list[dict]:
    return list(iter_journal(path))


class EventSink:
    """Publishes each event on PUB (dropped by ZeroMQ for slow subscribers, never blocking the pipeline)
    and appends it to the journal."""

    def __init__(self, context: zmq.Context, endpoint: str, journal_path: Path, hwm: int = 1000,
                 fsync: str = "event", secure: Callable[[zmq.Socket], None] | None = None) -> None:
        self.endpoint = endpoint
        self.journal_path = journal_path
        self._pub = context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        if secure is not None:  # CurveZMQ server (pipeline.security), set before the bind
            secure(self._pub)
        try:
            self._pub.bind(endpoint)
        except zmq.ZMQError as exc:
            self._pub.close()
            raise RuntimeError(f"events endpoint {endpoint}: cannot bind: {exc}") from None
        self.bound = self._pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.not_recording: str | None = None  # why the journal cannot be written, once it cannot
        try:
            self.journal: Journal | None = Journal(journal_path, fsync)
        except OSError as exc:
            self.journal = None
            self._lost(exc)

    def _lost(self, exc: OSError) -> None:
        """A full disk or an unwritable run folder: say so once; the stream keeps being published."""
        if self.not_recording is None:
            self.not_recording = f"journal {self.journal_path}: {exc.strerror or exc}"
            log.error("postprocess: not recording: %s (events are still published)", self.not_recording)

    def emit(self, event: dict) -> None:
        line = json.dumps(event, separators=(",", ":"))
        if self.journal is not None and self.not_recording is None:
            try:
                self.journal.write(line)
            except OSError as exc:
                self._lost(exc)
        self._pub.send_multipart([event["type"].encode(), line.encode()], flags=zmq.NOBLOCK)

    def close(self) -> None:
        try:
            if self.journal is not None:
                self.journal.close()
        except OSError as exc:
            self._lost(exc)
        finally:
            self._pub.close()
