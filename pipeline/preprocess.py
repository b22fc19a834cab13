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
from .messages import HOPS, FrameRef, Kind, PreparedInput, RefineRequest, Result, kind_of
from .refine import History
from .remote import WorkerBook
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
    bundle_sha256: str = ""  # what its workers must run
    held: deque[PreparedInput] = field(default_factory=deque)  # newest prepared frames, for "newest"/"all"
    wanted: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # worker -> (frames, ask id)
    answered: dict[bytes, int] = field(default_factory=dict)  # worker -> its last ask id answered
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

    A work link with a `remote` endpoint also serves workers on other machines (pipeline.remote): they
    return their results on the same connection, and preprocess relays them to postprocess.

    Links: `frames` in (FrameRef), `refine` in (RefineRequest), work links out (PreparedInput: `inputs`,
    and `screen_inputs` in a cascade), `remote_results` out (Result, relayed from remote workers)."""

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
            # The ROI is cut at the source, before the ring (pipeline/sources/screen.py).
            prepare = Letterbox.for_bundle(bundle.input, None, cfg.interpolation)
            self.outlets.append(_Outlet(link, self.open(link.name), prepare, bundle.sha256))
        self.live = next(o for o in self.outlets if o.newest)
        self.end_of_stream = False
        infer = self.config.infer
        self.history = History(int(infer.refine_window_s * 1e9)) if infer.refine != "off" else None
        self.requests = self.open("refine") if self.history is not None else None
        # What the history keeps: the inputs of the bundle that scores refined frames.
        self.keeps_for = next((o.prepare for o in self.outlets if o.refined), None)
        self._ended_at = 0.0
        relay = graph.links_from(self.name, Kind.RESULT)
        self.relay = self.open(relay[0].name) if relay else None
        self.book = WorkerBook(self.config.transport.remote_timeout_s) if relay else None

    def step(self, ready: bool) -> None:
        self._hear_workers()
        if self.book is not None:
            self._expire_workers()
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
        if self.end_of_stream and self.book is not None:
            self._drop_unclaimed()
        if (self.end_of_stream and not any(o.held for o in self.outlets)
                and not self._refining_after_end() and not (self.book and self.book.in_flight)):
            for outlet in self.outlets:
                for worker in outlet.known:
                    try:
                        self.send_eos(outlet.socket, to=worker)
                    except zmq.ZMQError:  # a worker that was restarted: its old self is gone
                        log.info("preprocess: infer worker %r is gone at the end of stream", worker)
            if self.relay is not None:
                self.send_eos(self.relay)
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
                kind = kind_of(msg)
                if kind is Kind.WANT:
                    self._hear_want(outlet, worker, msg)
                elif kind is Kind.RESULT and self.book is not None:
                    self._relay(worker, msg)
                elif kind is Kind.EOS and self.book is not None and worker in self.book.workers:
                    self._lose(outlet, worker)  # a remote worker that ended (it held nothing, or loses it)
                else:
                    self.reject(f"a {msg.kind!r} message from worker {worker!r}")

    def _hear_want(self, outlet: _Outlet, worker: bytes, msg: wire.Message) -> None:
        """`want n` with the asker's ask id (an idle remote worker repeats its ask as a heartbeat: the same
        id again is not a second ask) and the bundle it runs."""
        count, ask, relays = (msg.header.get(key) for key in ("n", "ask", "relay"))
        if type(count) is not int or count < 1 or type(ask) is not int or type(relays) is not bool:
            self.reject("a want without a positive count, an ask id and whether results come back")
            return
        if msg.header.get("bundle") != outlet.bundle_sha256:
            self.reject(f"a want from worker {worker!r} running another bundle than {outlet.link.name}'s "
                        f"({str(msg.header.get('bundle'))[:12]}, expected {outlet.bundle_sha256[:12]})")
            return
        if relays:
            if self.book is None:
                self.reject(f"worker {worker!r} would return results, but this run has no remote endpoint")
                return
            if self.book.heard(worker, time.monotonic()):
                self.counters["workers_joined"] += 1
                log.info("preprocess: remote worker %r serves %s", worker.decode(errors="replace"),
                         outlet.link.name)
        outlet.known.add(worker)
        if outlet.answered.get(worker) != ask:
            outlet.wanted[worker] = (count, ask)
            outlet.hold = max(outlet.hold, count)

    def _relay(self, worker: bytes, msg: wire.Message) -> None:
        """A remote worker's result, passed on to postprocess. Only its outputs are taken from it: the frame,
        geometry and timestamps are the ones preprocess handed out (the worker's clock is its own, so its
        inference time is placed to end now)."""
        now = time.monotonic()
        try:
            result = HOPS[Kind.RESULT](msg)
        except wire.WireError as exc:
            self.reject(f"a malformed result from worker {worker!r}: {exc}")
            return
        if self.book.heard(worker, now):
            self.counters["workers_joined"] += 1
        prepared = self.book.returned(worker, result.frame.id)
        if prepared is None:
            self.counters["remote_late"] += 1
            return
        stamps = prepared.frame.stamps
        took = max(0, result.frame.stamps["inf_out"] - result.frame.stamps["inf_in"])
        stamps["inf_out"] = time.monotonic_ns()
        stamps["inf_in"] = max(stamps["pre_out"], stamps["inf_out"] - took)
        self.push(self.relay, Result.of(prepared, result.outputs), wait=True, stamp=False, sent="relayed")

    def _expire_workers(self) -> None:
        for worker in self.book.silent(time.monotonic()):
            log.warning("preprocess: remote worker %r silent for %g s: gone", worker.decode(errors="replace"),
                        self.book.timeout_s)
            for outlet in self.outlets:
                self._lose(outlet, worker)

    def _lose(self, outlet: _Outlet, worker: bytes) -> None:
        """`worker` is gone from `outlet`; a remote one's frames are counted lost."""
        outlet.known.discard(worker)
        outlet.wanted.pop(worker, None)
        outlet.answered.pop(worker, None)
        if self.book is not None and worker in self.book.workers and not self.book.workers[worker].gone:
            for prepared in self.book.forget(worker):
                self._count_lost(prepared)
            self.counters["workers_lost"] += 1

    def _count_lost(self, prepared: PreparedInput) -> None:
        """A frame a remote worker took with it: a dropped frame, or a refinement less."""
        self.counters["refine_gone" if prepared.refined else "drop_worker_lost"] += 1

    def _drop_unclaimed(self) -> None:
        """At the end of the stream, frames held for a link that has had no worker for the remote timeout
        are dropped (with every inference remote, there may be no worker left to ask)."""
        if time.monotonic() - self._ended_at <= self.config.transport.remote_timeout_s:
            return
        for outlet in self.outlets:
            if outlet.held and not outlet.known:
                self.counters["drop_held"] += len(outlet.held)
                outlet.held.clear()

    def _dispatch(self, outlet: _Outlet) -> None:
        history = self.history
        while outlet.wanted and ((outlet.newest and outlet.held)
                                 or (outlet.refined and history is not None and history.pending)):
            worker, (count, ask) = outlet.wanted.popitem()
            batch = self._batch(outlet, count)
            if not batch:  # the requested frames were gone; the newest, if any, goes on the next pass
                outlet.wanted[worker] = (count, ask)
                continue
            outlet.answered[worker] = ask
            remote = self.book is not None and worker in self.book.workers
            sent = 0
            try:
                for prepared in batch:
                    if self.push(outlet.socket, prepared, wait=True, to=worker, stamp=False) and remote:
                        self.book.gave(worker, prepared)
                    sent += 1
            except zmq.ZMQError as exc:  # the worker is gone (EHOSTUNREACH); its frames are lost with it
                for prepared in batch[sent:]:
                    # A lost newest frame is a dropped frame; a lost refined one only a refinement less.
                    self.counters["refine_gone" if prepared.refined else "drop_send_full"] += 1
                self._lose(outlet, worker)
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

    def status(self) -> dict:
        """Remote workers, each counted (state, frames scored, held, lost), and the peers refused."""
        if getattr(self, "book", None) is None:
            return {}
        self.counters["refused"] = self.security.count_refused()
        return {"remote_workers": self.book.status()}

    def stop(self) -> None:
        if getattr(self, "ring", None) is not None:
            for outlet in self.outlets:
                outlet.held.clear()
            self.ring.close()
