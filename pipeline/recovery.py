"""What a restarted postprocess takes back from the journal, the pure part: where the sweep numbering
stands, which sweeps were still open (and their best frame so far), the case's best, and which frames
were already published, so the stream goes on with the same sweep ids and nothing is emitted twice.

What it cannot take back: the masks and full-resolution copies the lost process kept in memory. A final
best frame that is a recovered one is published with its score but without biometry or PNGs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .events import monotonic_ns_of
from .sweep import FrameInfo, ScoredFrame


@dataclass
class OpenSweep:
    """A sweep the journal saw start but not end."""

    sweep_id: int
    first: FrameInfo
    last: FrameInfo
    count: int
    best: ScoredFrame | None = None  # its last live best_frame
    # frame id -> (score, captured ns, refined): what refinement planning knew of the sweep
    scores: dict[int, tuple[float, int, bool]] = field(default_factory=dict)


@dataclass
class Recovered:
    next_sweep_id: int = 0
    # Frame ids of the open sweeps whose frame event is in the journal (older frames are all behind the
    # stream: a restarted postprocess publishes nothing before `open_from`).
    published: set[int] = field(default_factory=set)
    last_frame_id: int = -1  # the newest frame of the stream (capture order) the journal names
    open_from: int = 0  # the first frame of the oldest open sweep (after the last frame when none is open)
    open: list[OpenSweep] = field(default_factory=list)  # oldest first
    session_case: Any = None
    session_best: ScoredFrame | None = None


def _info(event: dict[str, Any]) -> FrameInfo:
    """A frame event as sweep tracking saw it (its time: the source's own, else the capture time)."""
    source = event.get("source") if isinstance(event.get("source"), dict) else {}
    pts = source.get("pts")
    t = pts if isinstance(pts, (int, float)) else monotonic_ns_of(float(event.get("t_capture") or 0.0)) / 1e9
    return FrameInfo(int(event["frame_id"]), float(t), float(event.get("score") or 0.0),
                     float(event.get("content", 1.0)), source)


def _scored(sweep_id: int, payload: dict[str, Any] | None) -> ScoredFrame | None:
    if not payload or payload.get("frame_id") is None:
        return None
    return ScoredFrame(sweep_id, int(payload["frame_id"]), float(payload.get("t") or 0.0),
                       float(payload["score"]), float(payload.get("raw_score", payload["score"])))


def recover(events: Iterable[dict[str, Any]]) -> Recovered:
    """The state a journal (read with `events.iter_journal`) leaves behind, in one pass that keeps only
    the open sweeps' frames."""
    out = Recovered()
    started: dict[int, dict[str, Any]] = {}
    frames: dict[int, list[dict[str, Any]]] = {}
    best: dict[int, dict[str, Any]] = {}
    for event in events:
        kind, sweep_id = event.get("type"), event.get("sweep_id")
        if kind == "frame" and event.get("frame_id") is not None:
            if not event.get("refined"):
                out.last_frame_id = max(out.last_frame_id, int(event["frame_id"]))
            if sweep_id is not None:
                frames.setdefault(sweep_id, []).append(event)
        elif kind == "sweep_started":
            started[sweep_id] = event
            out.next_sweep_id = max(out.next_sweep_id, sweep_id + 1)
        elif kind == "sweep_ended":
            started.pop(sweep_id, None)
            frames.pop(sweep_id, None)
            best.pop(sweep_id, None)
            out.last_frame_id = max(out.last_frame_id, int(event.get("frame_id") or -1))
        elif kind == "best_frame" and sweep_id is not None:
            if event.get("final"):
                out.session_case = started.get(sweep_id, {}).get("case")
                out.session_best = _scored(sweep_id, event.get("session_best"))
            else:
                best[sweep_id] = event
    for sweep_id in sorted(started):
        start = started[sweep_id]
        own = [e for e in frames.get(sweep_id, []) if not e.get("refined")]
        first = _info(own[0]) if own else FrameInfo(int(start["frame_id"]), float(start.get("t") or 0.0), 0.0,
                                                     1.0, {"case": start.get("case")})
        last = _info(max(own, key=lambda e: e["frame_id"])) if own else first
        sweep = OpenSweep(sweep_id, first, last, max(1, len(own)), _scored(sweep_id, best.get(sweep_id)))
        for event in frames.get(sweep_id, []):
            out.published.add(int(event["frame_id"]))
            if event.get("score") is not None and event.get("t_capture") is not None:
                sweep.scores[int(event["frame_id"])] = (float(event["score"]),
                                                        monotonic_ns_of(float(event["t_capture"])),
                                                        bool(event.get("refined")))
        out.open.append(sweep)
    out.open_from = min((s.first.frame_id for s in out.open), default=out.last_frame_id + 1)
    return out
