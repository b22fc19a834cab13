"""Event objects: the same JSON goes to the PUB socket (topic = event type) and to the run's journal."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import zmq

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


def make_event(kind: str, run_id: str, *, sweep_id: int | None = None, frame_id: int | None = None,
               t_capture_ns: int | None = None, latency_ms: float | None = None, **fields: Any) -> dict:
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}")
    return {"schema": SCHEMA_VERSION, "type": kind, "run_id": run_id, "sweep_id": sweep_id,
            "frame_id": frame_id, "t_capture": None if t_capture_ns is None else wall_time(t_capture_ns),
            "t_event": round(time.time(), 6),
            "latency_ms": None if latency_ms is None else round(latency_ms, 3), **fields}


class Journal:
    """Append-only JSONL, flushed per event so a crash loses nothing already emitted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the stage

    def write(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class EventSink:
    """Publishes each event on PUB (dropped by ZeroMQ for slow subscribers, never blocking the pipeline)
    and appends it to the journal."""

    def __init__(self, context: zmq.Context, endpoint: str, journal_path: Path, hwm: int = 1000) -> None:
        self.endpoint = endpoint
        self._pub = context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        try:
            self._pub.bind(endpoint)
        except zmq.ZMQError as exc:
            self._pub.close()
            raise RuntimeError(f"events endpoint {endpoint}: cannot bind: {exc}") from None
        self.bound = self._pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.journal = Journal(journal_path)

    def emit(self, event: dict) -> None:
        line = json.dumps(event, separators=(",", ":"))
        self.journal.write(line)
        self._pub.send_multipart([event["type"].encode(), line.encode()], flags=zmq.NOBLOCK)

    def close(self) -> None:
        self.journal.close()
        self._pub.close()
