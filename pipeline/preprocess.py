"""Preprocess: full-resolution frame in the ring -> model input (ROI, pad to square, resize, channels), held
until an infer worker asks for work."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from . import wire
from .config import refine_history_bytes
from .graph import FLOOD_IN_FLIGHT, Link
from .letterbox import Letterbox
from .messages import FrameRef, Kind, PreparedInput, RefineRequest, kind_of
from .refine import History
from .ring import FrameRing
from .stage import MAX_TAKE, Stage

log = logging.getLogger("sweepstream")


@dataclass
class _Outlet:
    """One work link preprocess serves: its ROUTER, the workers that asked on it, the preparation its
    workers' bundle needs, and which frames it serves (graph.Link.serves)."""

    link: Link
    socket: zmq.Socket
    prepare: Letterbox
    held: deque[PreparedInput] = field(default_factory=deque)  # newest prepared frames, for "newest"/"all"
    wanted: dict[bytes, int] = field(default_factory=dict)  # worker -> frames it asked for
    known: set[bytes] = field(default_factory=set)
    hold: int = 1  # grows to the largest batch a worker asks for (its engine's max_batch)
    newest_turn: bool = True  # "all": with refinement pending, newest and refined frames take turns

    @property
    def newest(self) -> bool:
        return self.link.serves != "refined"

    @property
    def refined(self) -> bool:
        return self.link.serves != "newest"


class PreprocessStage(Stage):
    """Prepares every frame it takes and holds the newest of them (as many as the largest batch a worker
    has asked for) until an infer worker asks for work. Infer pulls, so no prepared frame ever waits in a
    socket queue behind newer ones: under overload latency stays about one inference plus one frame
    period, and N workers share the load.

    With refinement on, every frame is prepared into a bounded history, and frames postprocess asks for
    (`refine` link) are sent again, marked refined, when a worker asks and the newest has had its turn.
    In a screening cascade the screen's link serves the newest frames and the main model's link only the
    refined ones, each prepared for its own bundle's input.

    Links: `frames` in (FrameRef), `refine` in (RefineRequest), work links out (PreparedInput: `inputs`,
    and `screen_inputs` in a cascade)."""

    stamp_in = "pre_in"
    stamp_out = "pre_out"

    def start(self) -> None:
        cfg = self.config.preprocess
        graph = self.wiring.graph
        self.outlets: list[_Outlet] = []
        self.ring = FrameRing.attach(self.wiring.ring)
        self.frames = self.open("frames")
        for link in graph.links_from(self.name, Kind.INPUT):
            bundle = self.bundles[graph.stage(link.receiver).bundle]
            prepare = Letterbox.for_bundle(bundle.input, cfg.roi, cfg.interpolation)
            self.outlets.append(_Outlet(link, self.open(link.name), prepare))
        self.live = next(o for o in self.outlets if o.newest)
        self.end_of_stream = False
        infer = self.config.infer
        self.history = History(int(infer.refine_window_s * 1e9)) if infer.refine != "off" else None
        self.requests = self.open("refine") if self.history is not None else None
        # What the history keeps: the inputs of the bundle that scores refined frames.
        self.keeps_for = next((o.prepare for o in self.outlets if o.refined), None)
        self._ended_at = 0.0

    def step(self, ready: bool) -> None:
        self._hear_workers()
        self._hear_requests()
        if not self.end_of_stream and (not self._lossless or len(self.live.held) < self.live.hold):
            frames, self.end_of_stream = self.take(self.frames, keep=self._keep())
            for ref in frames:
                self._prepare(ref)
            if frames:
                self.ring.mark_consumed(frames[-1].id)
            if self.end_of_stream:
                self._ended_at = time.monotonic()
        for outlet in self.outlets:
            self._dispatch(outlet)
        if (self.end_of_stream and not any(o.held for o in self.outlets)
                and not self._refining_after_end()):
            for outlet in self.outlets:
                for worker in outlet.known:
                    try:
                        self.send_eos(outlet.socket, to=worker)
                    except zmq.ZMQError:  # a worker that was restarted: its old self is gone
                        log.info("preprocess: infer worker %r is gone at the end of stream", worker)
            self.finished = True

    def _keep(self) -> int:
        """How many of the waiting frames to prepare. A flooded recording is held back by capture to
        FLOOD_IN_FLIGHT frames, all of which are wanted (taking more would take away capture's
        backpressure). A live source's older frames are stale once a newer one waits, unless refinement
        may want them later: then all are prepared into its history, and the held queue keeps the newest."""
        if self.config.source.flood:
            return min(FLOOD_IN_FLIGHT, self.live.hold)
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
        for outlet in self.outlets:
            while True:
                try:
                    routed = wire.recv_routed(outlet.socket)
                except wire.WireError as exc:
                    self.reject(f"a malformed request: {exc}")
                    continue
                if routed is None:
                    break
                worker, msg = routed
                count = msg.header.get("n")
                if kind_of(msg) is not Kind.WANT or type(count) is not int or count < 1:
                    self.reject(f"a {msg.kind!r} request without a positive count")
                    continue
                outlet.known.add(worker)
                outlet.wanted[worker] = count
                outlet.hold = max(outlet.hold, count)

    def _dispatch(self, outlet: _Outlet) -> None:
        history = self.history
        while outlet.wanted and ((outlet.newest and outlet.held)
                                 or (outlet.refined and history is not None and history.pending)):
            worker, count = outlet.wanted.popitem()
            batch = self._batch(outlet, count)
            if not batch:  # the requested frames were gone; the newest, if any, goes on the next pass
                outlet.wanted[worker] = count
                continue
            try:
                for prepared in batch:
                    self.push(outlet.socket, prepared, wait=True, to=worker, stamp=False)
            except zmq.ZMQError as exc:  # the worker is gone (EHOSTUNREACH); its frame is lost with it
                outlet.known.discard(worker)
                # A lost newest frame is a dropped frame; a lost refined one only a refinement less.
                self.counters["drop_send_full" if outlet.newest else "refine_gone"] += 1
                log.warning("preprocess: infer worker %r is gone: %s", worker, exc)

    def _batch(self, outlet: _Outlet, count: int) -> list[PreparedInput]:
        """Up to `count` frames for one worker: the held newest ones, then requested refinements. With both
        waiting on one link they take turns, so a refinement delays a newest frame by at most the one
        inference."""
        history = self.history
        pending = outlet.refined and history is not None and history.pending
        refine_first = pending and not (outlet.newest and outlet.newest_turn)
        batch: list[PreparedInput] = []
        if outlet.newest and not refine_first:
            while outlet.held and len(batch) < count:
                batch.append(outlet.held.popleft())
                if history is not None and outlet.refined:  # scored by the model that refines
                    history.sent_newest(batch[-1].frame.id)
        while outlet.refined and history is not None and len(batch) < count:
            prepared, gone = history.next()
            self.counters["refine_gone"] += gone
            if prepared is None:
                break
            batch.append(prepared)
            self.counters["refine_sent"] += 1
        outlet.newest_turn = refine_first or not batch
        return batch

    def _prepare(self, ref: FrameRef) -> None:
        view = self.ring.borrow(ref.slot, ref.seq) if 0 <= ref.slot < self.ring.slots else None
        if view is not None:
            prepared: dict[Letterbox, PreparedInput] = {}  # one preparation per distinct bundle input
            for prepare in {self.live.prepare, self.keeps_for} - {None}:
                done = prepare(view)
                prepared[prepare] = PreparedInput(ref, done.geometry, done.content, done.pixels)
            del view
            if self.ring.valid(ref.slot, ref.seq):
                ref.stamps[self.stamp_out] = time.monotonic_ns()  # waiting for a worker is transport
                held = self.live.held
                if len(held) == self.live.hold:
                    held.popleft()
                    self.counters["drop_held"] += 1
                held.append(prepared[self.live.prepare])
                if self.history is not None and self.keeps_for is not None:
                    self.history.add(prepared[self.keeps_for])
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
            for outlet in self.outlets:
                outlet.held.clear()
            self.ring.close()
