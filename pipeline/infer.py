"""Infer: batches of model input -> engine -> head outputs, one result message per frame."""

from __future__ import annotations

import logging
import math
import time
from typing import ClassVar

import numpy as np
import zmq

from engines.base import Engine, EngineTimeout

from . import wire
from .messages import Kind, PreparedInput, Result, control
from .stage import Stage
from .steps import infer_batch, load_engine

log = logging.getLogger("sweepstream")
ASK_AGAIN_S = 0.25  # a request for work unanswered this long is sent again


class InferStage(Stage):
    """Asks preprocess for up to a batch of frames whenever it is idle, runs them as one batch, and passes
    one result per frame on. Several infer workers may share one preprocess (the scale-out path).
    `infer.rate_limit_fps` spaces the batches out (a CPU shared with the machine's own software, or a
    benchmark emulating a slower cart): the wait is before asking, so what it then gets is the newest.

    The same class plays the screen of a screening cascade (its own bundle, its own links; the rate limit
    is the main model's, so the screen runs free).

    A batch the engine cannot answer in time (EngineTimeout: a remote server slow or gone) loses its
    frames, counted, and the stage goes on asking for the newest ones.

    Links: a work link in (asks for work, takes PreparedInput: `inputs`, or `screen_inputs`), a results
    link out (Result: `results`, or `screened`)."""

    stamp_in = "inf_in"
    stamp_out = "inf_out"
    relays: ClassVar[bool] = False  # results go back on the work connection (a remote worker)
    engine: Engine | None = None  # set before start by a worker that serves several runs from one engine
    reason = ""

    def start(self) -> None:
        if self.engine is None:
            self.engine, self.reason = load_engine(self.config.infer, self.bundle)
            log.info("infer: %s", self.reason)
        self.input_shape = self.bundle.input.frame_shape
        graph = self.wiring.graph
        self.work, self.out = self.open_links()
        rate = self.config.infer.rate_limit_fps if graph.stage(self.name).bundle == "main" else None
        self.min_interval_s = 0.0 if rate is None else 1.0 / rate
        self._next_ask = 0.0  # when the engine may take its next batch (rate limit)
        self._asking = True
        self._asks = 0
        self._ask()

    def open_links(self) -> tuple[zmq.Socket, zmq.Socket]:
        """The work link in and the results link out (a remote worker: one connection for both)."""
        graph = self.wiring.graph
        (work,), (out,) = graph.links_into(self.name, Kind.INPUT), graph.links_from(self.name, Kind.RESULT)
        return self.open(work.name), self.open(out.name)

    def want(self) -> wire.Message:
        """The standing ask: up to a batch, its id (the same until answered), the bundle this engine runs,
        and whether results come back on the work connection (`relays`: a remote worker)."""
        return control(Kind.WANT, {"n": self.engine.max_batch, "ask": self._asks,
                                   "bundle": self.bundle.sha256, "relay": self.relays})

    def _ask(self) -> None:
        self._asks += 1
        if not wire.send(self.work, self.want(), block=True):
            raise RuntimeError("infer: preprocess did not take a request for work")
        self._asked_at = time.monotonic()

    @property
    def waiting(self) -> bool:
        """Asked for work and not yet given any."""
        return self._asking

    def step(self, ready: bool) -> None:
        if self._asking and time.monotonic() - self._asked_at > ASK_AGAIN_S:
            # The standing ask again (same id: it cannot fetch a second batch): a restarted preprocess
            # never heard it. Not taken now (no peer yet), it is tried again later.
            wire.send(self.work, self.want())
            self._asked_at = time.monotonic()
        if not self._asking:
            wait = self._next_ask - time.monotonic()
            if wait > 0:
                self.poll_ms = max(1, min(100, math.ceil(wait * 1000)))  # wake when the limit allows
            else:
                self._asking, self.poll_ms = True, type(self).poll_ms
                self._ask()
        if not ready:
            return
        frames, end = self.take(self.work, keep=self.engine.max_batch)
        if frames:
            self._run(frames)
        if end:
            self.send_eos(self.out)
            self.finished = True
        elif frames:
            self._asking = False  # asked again in step once the rate limit allows
            self._next_ask = self._batch_started + self.min_interval_s * len(frames)
            self.step(False)

    def _run(self, frames: list[PreparedInput]) -> None:
        self._batch_started = time.monotonic()
        try:
            rows = infer_batch(self.engine, self.bundle, [prepared.pixels for prepared in frames])
        except EngineTimeout as exc:
            self._lost(frames, exc)
            return
        finally:  # a remote engine's link, for health (engine_unreachable: 1 while its server is lost)
            self.counters["engine_reconnects"] = self.engine.reconnects
            self.counters["engine_unreachable"] = int(not self.engine.reachable)
        for prepared, outputs in zip(frames, rows, strict=True):
            # Waiting here (rather than dropping a result already paid for) slows infer's pulling, so an
            # overloaded postprocess makes preprocess drop the oldest unscored frames instead.
            self.push(self.out, Result.of(prepared, outputs), wait=True)

    def _lost(self, frames: list[PreparedInput], exc: EngineTimeout) -> None:
        """A batch the engine did not answer in time (a remote server slow or gone): its frames are
        dropped and counted, newest ones in the frame accounting (drop_engine_timeout), refined ones apart
        (their sweep's final best_frame stops waiting for them at infer.refine_timeout_s)."""
        refined = sum(prepared.refined for prepared in frames)
        self.counters["drop_engine_timeout"] += len(frames) - refined
        self.counters["refine_engine_timeout"] += refined
        lost = self.counters["drop_engine_timeout"] + self.counters["refine_engine_timeout"]
        if lost <= len(frames) or lost // 100 > (lost - len(frames)) // 100:
            log.warning("infer: %d frame(s) dropped: %s (%d so far)", len(frames), exc, lost)

    def acceptable(self, hop: PreparedInput) -> bool:
        pixels = hop.pixels
        if pixels.dtype != np.uint8 or pixels.shape != self.input_shape:
            self.reject(f"frame {hop.frame.id}: expected uint8{list(self.input_shape)}, "
                        f"got {pixels.dtype}{list(pixels.shape)}")
            return False
        return True

    def describe(self) -> dict:
        return {"engine": self.engine.describe(), "selection": self.reason}

    def stop(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.close()
