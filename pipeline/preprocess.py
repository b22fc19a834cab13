"""Preprocess: full-resolution frame in the ring -> model input (ROI, pad to square, resize, channels), held
until an infer worker asks for work."""

from __future__ import annotations

import logging
import math
import time
from collections import deque

import zmq

from . import wire
from .config import refine_history_bytes
from .graph import FLOOD_IN_FLIGHT
from .letterbox import Letterbox
from .messages import FrameRef, Kind, PreparedInput, RefineRequest, kind_of
from .refine import History
from .ring import FrameRing
from .stage import MAX_TAKE, Stage

log = logging.getLogger("sweepstream")


class PreprocessStage(Stage):
    """Prepares every frame it takes and holds the newest of them (as many as the largest batch a worker
    has asked for) until an infer worker asks for work. Infer pulls, so no prepared frame ever waits in a
    socket queue behind newer ones: under overload latency stays about one inference plus one frame
    period, and N workers share the load.

    With refinement on, every frame is prepared into a bounded history, and frames postprocess asks for
    (`refine` link) are sent again, marked refined, when a worker asks and the newest has had its turn.

    Links: `frames` in (FrameRef), `refine` in (RefineRequest), `inputs` out (PreparedInput)."""

    stamp_in = "pre_in"
    stamp_out = "pre_out"

    def start(self) -> None:
        cfg = self.config.preprocess
        # The ROI is cut at the source, before the ring (pipeline/sources/screen.py)
        self.prepare = Letterbox.for_bundle(self.bundle.input, None, cfg.interpolation)
        self.ring = FrameRing.attach(self.wiring.ring)
        self.frames = self.open("frames")
        self.hold = 1  # grows to the largest batch a worker asks for (its engine's max_batch)
        self.workers = self.open("inputs")
        self.held: deque[PreparedInput] = deque()
        self.wanted: dict[bytes, int] = {}  # worker -> frames it asked for
        self.known: set[bytes] = set()
        self.end_of_stream = False
        infer = self.config.infer
        self.history = History(int(infer.refine_window_s * 1e9)) if infer.refine != "off" else None
        self.requests = self.open("refine") if self.history is not None else None
        self._newest_turn = True  # with refinement pending, newest and refined frames take turns
        self._ended_at = 0.0

    def step(self, ready: bool) -> None:
        self._hear_workers()
        self._hear_requests()
        if not self.end_of_stream and (not self._lossless or len(self.held) < self.hold):
            frames, self.end_of_stream = self.take(self.frames, keep=self._keep())
            for ref in frames:
                self._prepare(ref)
            if frames:
                self.ring.mark_consumed(frames[-1].id)
            if self.end_of_stream:
                self._ended_at = time.monotonic()
        self._dispatch()
        if self.end_of_stream and not self.held and not self._refining_after_end():
            for worker in self.known:
                self.send_eos(self.workers, to=worker)
            self.finished = True

    def _keep(self) -> int:
        """How many of the waiting frames to prepare. A flooded recording is held back by capture to
        FLOOD_IN_FLIGHT frames, all of which are wanted (taking more would take away capture's
        backpressure). A live source's older frames are stale once a newer one waits, unless refinement
        may want them later: then all are prepared into its history, and the held queue keeps the newest."""
        if self.config.source.flood:
            return min(FLOOD_IN_FLIGHT, self.hold)
        return MAX_TAKE if self.history is not None and not self._lossless else 1

    def _refining_after_end(self) -> bool:
        """At the end of a recording, the last sweep's refinement may still be under way: serve it until
        postprocess asks for nothing more and nothing is in flight, or refine_timeout_s passes."""
        if self.history is None or time.monotonic() - self._ended_at > self.config.infer.refine_timeout_s:
            return False
        return self.history.pending or self.history.in_flight > 0

    def _hear_requests(self) -> None:
        while self.requests is not None:
            try:
                msg = wire.recv(self.requests)
                if msg is None:
                    return
                request = RefineRequest.from_message(msg)
            except wire.WireError as exc:
                self.reject(f"a malformed refine request: {exc}")
                continue
            self.history.request(request.frame_ids, request.scored)

    def _hear_workers(self) -> None:
        while True:
            try:
                routed = wire.recv_routed(self.workers)
            except wire.WireError as exc:
                self.reject(f"a malformed request: {exc}")
                continue
            if routed is None:
                return
            worker, msg = routed
            count = msg.header.get("n")
            if kind_of(msg) is not Kind.WANT or type(count) is not int or count < 1:
                self.reject(f"a {msg.kind!r} request without a positive count")
                continue
            self.known.add(worker)
            self.wanted[worker] = count
            self.hold = max(self.hold, count)

    def _dispatch(self) -> None:
        while self.wanted and (self.held or (self.history is not None and self.history.pending)):
            worker, count = self.wanted.popitem()
            batch = self._batch(count)
            if not batch:  # the requested frames were gone; the newest, if any, goes on the next pass
                self.wanted[worker] = count
                continue
            try:
                for prepared in batch:
                    self.push(self.workers, prepared, wait=True, to=worker, stamp=False)
            except zmq.ZMQError as exc:  # the worker is gone (EHOSTUNREACH); its frame is lost with it
                self.known.discard(worker)
                self.counters["drop_send_full"] += 1
                log.warning("preprocess: infer worker %r is gone: %s", worker, exc)

    def _batch(self, count: int) -> list[PreparedInput]:
        """Up to `count` frames for one worker: the held newest ones, then requested refinements. With both
        waiting they take turns, so a refinement delays a newest frame by at most the one inference."""
        history = self.history
        refine_first = history is not None and history.pending and not self._newest_turn
        batch: list[PreparedInput] = []
        if not refine_first:
            while self.held and len(batch) < count:
                batch.append(self.held.popleft())
                if history is not None:
                    history.sent_newest(batch[-1].frame.id)
        while history is not None and len(batch) < count:
            prepared, gone = history.next()
            self.counters["refine_gone"] += gone
            if prepared is None:
                break
            batch.append(prepared)
            self.counters["refine_sent"] += 1
        self._newest_turn = refine_first or not batch
        return batch

    def _prepare(self, ref: FrameRef) -> None:
        view = self.ring.borrow(ref.slot, ref.seq) if 0 <= ref.slot < self.ring.slots else None
        if view is not None:
            prepared = self.prepare(view)
            del view
            if self.ring.valid(ref.slot, ref.seq):
                ref.stamps[self.stamp_out] = time.monotonic_ns()  # waiting for a worker is transport
                if len(self.held) == self.hold:
                    self.held.popleft()
                    self.counters["drop_held"] += 1
                ready = PreparedInput(ref, prepared.geometry, prepared.content, prepared.pixels)
                self.held.append(ready)
                if self.history is not None:
                    self.history.add(ready)
                return
        self.counters["drop_overwritten"] += 1

    def describe(self) -> dict:
        """The refinement history's bound (its window at REFINE_MAX_FPS of this bundle's inputs)."""
        if self.history is None:
            return {"refine": None}
        window = self.config.infer.refine_window_s
        bound = refine_history_bytes(window, math.prod(self.bundle.input.frame_shape))
        return {"refine": {"window_s": window, "max_history_mib": round(bound / 2**20, 1)}}

    def stop(self) -> None:
        if getattr(self, "ring", None) is not None:
            self.held.clear()
            self.ring.close()
