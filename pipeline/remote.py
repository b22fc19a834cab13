"""Remote infer workers as preprocess sees them: which frames each holds, when it was last heard, and when
it is gone. Pure bookkeeping (no sockets): preprocess feeds it what it sends and hears.

A remote worker asks for work and returns its results over the one connection it made to preprocess, so
the frames handed out and the frames come back are counted in one place: a worker that vanishes costs
exactly the frames it held (counted as drops), a result for a frame it was not given, or no longer
awaited, is refused, and nothing is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .messages import PreparedInput


@dataclass
class RemoteWorker:
    name: str
    last_seen: float
    held: dict[int, PreparedInput] = field(default_factory=dict)  # frame id -> what it was given
    scored: int = 0
    lost: int = 0
    gone: bool = False


class WorkerBook:
    """Workers by routing id. `timeout_s`: silent this long (no request, no result), a worker is gone."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.workers: dict[bytes, RemoteWorker] = {}

    def heard(self, worker: bytes, now: float) -> bool:
        """A message from `worker`; True when it is new, or back after being declared gone."""
        known = self.workers.get(worker)
        if known is None:
            self.workers[worker] = RemoteWorker(worker.decode(errors="replace"), now)
            return True
        known.last_seen = now
        back, known.gone = known.gone, False
        return back

    def gave(self, worker: bytes, prepared: PreparedInput) -> None:
        self.workers[worker].held[prepared.frame.id] = prepared

    def returned(self, worker: bytes, frame_id: int) -> PreparedInput | None:
        """The frame a result answers, or None when `worker` was not given it or is no longer awaited."""
        known = self.workers.get(worker)
        if known is None or known.gone:
            return None
        prepared = known.held.pop(frame_id, None)
        known.scored += prepared is not None
        return prepared

    def silent(self, now: float) -> list[bytes]:
        """Workers not yet declared gone that have been silent past the timeout."""
        return [worker for worker, known in self.workers.items()
                if not known.gone and now - known.last_seen > self.timeout_s]

    def forget(self, worker: bytes) -> list[PreparedInput]:
        """`worker` is gone (unreachable, finished or silent): the frames it held are lost."""
        known = self.workers[worker]
        lost = list(known.held.values())
        known.held.clear()
        known.lost += len(lost)
        known.gone = True
        return lost

    @property
    def in_flight(self) -> int:
        return sum(len(known.held) for known in self.workers.values())

    def serving(self) -> int:
        return sum(not known.gone for known in self.workers.values())

    def status(self) -> dict[str, Any]:
        """For health events: each worker's state and figures."""
        return {known.name: {"state": "gone" if known.gone else "serving", "scored": known.scored,
                             "in_flight": len(known.held), "lost": known.lost}
                for known in self.workers.values()}
