"""Preprocess: full-resolution frame in the ring -> model input (ROI, pad to square, resize, channels), held
until an infer worker asks for work."""

from __future__ import annotations

import logging
import time
from collections import deque

import zmq

from . import wire
from .graph import FLOOD_IN_FLIGHT
from .letterbox import Letterbox
from .messages import FrameRef, Kind, PreparedInput, kind_of
from .ring import FrameRing
from .stage import Stage

log = logging.getLogger("sweepstream")


class PreprocessStage(Stage):
    """Prepares every frame it takes and holds the newest of them (as many as the largest batch a worker
    has asked for) until an infer worker asks for work. Infer pulls, so no prepared frame ever waits in a
    socket queue behind newer ones: under overload latency stays about one inference plus one frame
    period, and N workers share the load.

    Links: `frames` in (FrameRef), `inputs` out (PreparedInput, to workers that ask)."""

    stamp_in = "pre_in"
    stamp_out = "pre_out"

    def start(self) -> None:
        cfg = self.config.preprocess
        self.prepare = Letterbox.for_bundle(self.bundle.input, cfg.roi, cfg.interpolation)
        self.ring = FrameRing.attach(self.wiring.ring)
        self.frames = self.open("frames")
        self.hold = 1  # grows to the largest batch a worker asks for (its engine's max_batch)
        self.workers = self.open("inputs")
        self.held: deque[PreparedInput] = deque()
        self.wanted: dict[bytes, int] = {}  # worker -> frames it asked for
        self.known: set[bytes] = set()
        self.end_of_stream = False

    def step(self, ready: bool) -> None:
        self._hear_workers()
        if not self.end_of_stream and (not self._lossless or len(self.held) < self.hold):
            # A live source's older frames are stale once a newer one waits; a flooded one is held back by
            # capture to FLOOD_IN_FLIGHT frames, all of which are wanted.
            keep = FLOOD_IN_FLIGHT if self.config.source.flood else 1
            frames, self.end_of_stream = self.take(self.frames, keep=min(keep, self.hold))
            for ref in frames:
                self._prepare(ref)
            if frames:
                self.ring.mark_consumed(frames[-1].id)
        self._dispatch()
        if self.end_of_stream and not self.held:
            for worker in self.known:
                self.send_eos(self.workers, to=worker)
            self.finished = True

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
        while self.held and self.wanted:
            worker, count = self.wanted.popitem()
            try:
                for _ in range(min(count, len(self.held))):
                    self.push(self.workers, self.held.popleft(), wait=True, to=worker, stamp=False)
            except zmq.ZMQError as exc:  # the worker is gone (EHOSTUNREACH); its frame is lost with it
                self.known.discard(worker)
                self.counters["drop_send_full"] += 1
                log.warning("preprocess: infer worker %r is gone: %s", worker, exc)

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
                self.held.append(PreparedInput(ref, prepared.geometry, prepared.content, prepared.pixels))
                return
        self.counters["drop_overwritten"] += 1

    def stop(self) -> None:
        if getattr(self, "ring", None) is not None:
            self.held.clear()
            self.ring.close()
