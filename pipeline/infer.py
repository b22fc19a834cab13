"""Infer: batches of model input -> engine -> head outputs, one result message per frame."""

from __future__ import annotations

import logging
import os

import numpy as np
import zmq

from engines.base import EngineOptions
from engines.registry import select_engine

from . import wire
from .stage import Stage
from .wire import Message

log = logging.getLogger("sweepstream")


def default_threads() -> int:
    """One core fewer than the process may use: capture, preprocess and postprocess need one between them,
    and an engine that spreads over every core stalls behind them (measured on 2 cores with the demo:
    end-to-end p99 32.0 ms with 2 ORT threads, 27.6 ms with 1)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


class InferStage(Stage):
    """Asks preprocess for up to a batch of frames whenever it is idle, runs them as one batch, and passes
    one result per frame on. Several infer workers may share one preprocess (the scale-out path)."""

    name = "infer"
    stamp_in = "inf_in"
    stamp_out = "inf_out"

    def start(self) -> None:
        cfg = self.config.infer
        options = EngineOptions(threads=cfg.threads or default_threads(), device=cfg.device,
                                max_batch=cfg.max_batch, precision=cfg.precision)
        self.engine, self.reason = select_engine(cfg.engine, self.bundle, options)
        self.engine.load()
        log.info("infer: %s", self.reason)
        self.output_names = list(self.bundle.outputs)
        self.input_shape = self.bundle.input.frame_shape
        self.work = self.socket(zmq.DEALER, self.endpoints.inputs, bind=False,
                                hwm=max(self.config.transport.hwm, self.engine.max_batch + 1))
        # A batch's results leave together; the mark must fit one batch or its tail would be dropped.
        self.out = self.socket(zmq.PUSH, self.endpoints.results, bind=False,
                               hwm=max(self.config.transport.hwm, self.engine.max_batch + 1))
        self._ask()

    def _ask(self) -> None:
        wire.send(self.work, Message("want", {"n": self.engine.max_batch}), block=True)

    def step(self, ready: bool) -> None:
        if not ready:
            return
        frames, end = self.take(self.work, keep=self.engine.max_batch)
        frames = [msg for msg in frames if self._has_input(msg)]
        if frames:
            self._run(frames)
        if end:
            self.send_eos(self.out)
            self.finished = True
        elif frames:
            self._ask()

    def _run(self, frames: list[Message]) -> None:
        batch = np.stack([msg.arrays[0] for msg in frames])
        short = self.bundle.min_batch - len(frames)
        if short > 0:  # a bundle built for a fixed batch: pad with copies, use only the real rows
            batch = np.concatenate([batch, np.repeat(batch[-1:], short, axis=0)])
        outputs = self.engine.infer(batch)
        for i, msg in enumerate(frames):
            msg.header["outputs"] = self.output_names
            # Waiting here (rather than dropping a result already paid for) slows infer's pulling, so an
            # overloaded postprocess makes preprocess drop the oldest unscored frames instead.
            self.push(self.out, Message("result", msg.header,
                                        tuple(outputs[name][i] for name in self.output_names)), wait=True)

    def _has_input(self, msg: Message) -> bool:
        array = msg.arrays[0] if len(msg.arrays) == 1 else None
        if array is None or array.dtype != np.uint8 or array.shape != self.input_shape:
            got = "no tensor" if array is None else f"{array.dtype}{list(array.shape)}"
            self.reject(f"frame {msg.header.get('id')}: expected uint8{list(self.input_shape)}, got {got}")
            return False
        return True

    def describe(self) -> dict:
        return {"engine": self.engine.describe(), "selection": self.reason}

    def stop(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.close()
