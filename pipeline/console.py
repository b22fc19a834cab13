"""The live console view: sweep, best-frame and biometry events as one readable line each, printed by
the supervisor between its status lines (tools/listen.py shows the same events from another terminal)."""

from __future__ import annotations

import json
from typing import Any

import zmq

from .security import ClientKeys

SHOWN = ("sweep_started", "best_frame", "biometry", "sweep_ended")


def _number(value: Any, fmt: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def format_event(event: dict[str, Any]) -> str | None:
    """One line for a shown event type, None for the others."""
    kind = event.get("type")
    if kind not in SHOWN:
        return None
    head = f"sweep {event.get('sweep_id')}"
    latency = "" if event.get("latency_ms") is None else f"  ({event['latency_ms']:.0f} ms)"
    if kind == "sweep_started":
        case = f" case {event['case']}" if event.get("case") is not None else ""
        return f"{head} started at frame {event.get('frame_id')}{case} ({event.get('reason')})"
    if kind == "sweep_ended":
        return (f"{head} ended at frame {event.get('frame_id')}: {event.get('frame_count')} frames "
                f"({event.get('reason')})")
    if kind == "best_frame":
        label = "final best frame" if event.get("final") else "best frame"
        if event.get("frame_id") is None:
            return f"{head} {label}: none ({event.get('reason')})"
        saved = f"  -> {event['frame_png']}" if event.get("frame_png") else ""
        return (f"{head} {label} {event['frame_id']}  score {_number(event.get('score'), '.3f')}"
                f"{latency}{saved}")
    label = "AC (median of top frames)" if event.get("final") else "AC"
    if event.get("status") != "ok":
        return f"{head} {label}: not measured ({event.get('status')})"
    size = (_number(event.get("ac_mm"), ".1f", " mm") if event.get("unit") == "mm"
            else _number(event.get("ac_px"), ".1f", " px (uncalibrated)"))
    ga = _number(event.get("ga_weeks"), ".1f", " weeks")
    flags = f"  [{', '.join(event['flags'])}]" if event.get("flags") else ""
    return (f"{head} {label} {size}  GA {ga}  frame {event.get('frame_id')}  "
            f"confidence {_number(event.get('confidence'), '.2f')}{latency}{flags}")


def local_endpoint(endpoint: str) -> str:
    """Where a subscriber on this host connects to an endpoint bound on every interface."""
    return endpoint.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:").replace("tcp://*:", "tcp://127.0.0.1:")


class EventView:
    """Subscribes to the pipeline's own event socket; never blocks the supervisor."""

    def __init__(self, context: zmq.Context, endpoint: str, keys: ClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self._sub = context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        if keys is not None:  # a run with Curve keys: the console is their client `console`
            keys.apply(self._sub)
        for topic in SHOWN:
            self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sub.connect(local_endpoint(endpoint))

    def lines(self) -> list[str]:
        out = []
        while True:
            try:
                _, body = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            line = format_event(json.loads(body))
            if line is not None:
                out.append(line)

    def close(self) -> None:
        self._sub.close()
