"""Infer: batches of model input -> engine -> head outputs, one result message per frame."""

from __future__ import annotations

import logging

import numpy as np
import zmq

from engines.base import Bundle, EngineOptions, load_bundle, select_engine

from .stage import Stage
from .wire import Message

log = logging.getLogger("sweepstream")


class InferStage(Stage):
    name = "infer"
    stamp_in = "inf_in"
    stamp_out = "inf_out"

    def start(self) -> None:
        cfg = self.config.infer
        self.bundle: Bundle = load_bundle(cfg.bundle)
        options = EngineOptions(threads=cfg.threads, device=cfg.device, max_batch=cfg.max_batch)
        self.engine, self.reason = select_engine(cfg.engine, self.bundle, options)
        self.engine.load()
        log.info("infer: %s", self.reason)
        self.output_names = list(self.bundle.outputs)
        spec = self.bundle.input
        self.input_shape = (spec.size, spec.size) + ((spec.channels,) if spec.channels > 1 else ())
        self.inputs_sock = self.socket(zmq.PULL, self.endpoints.inputs, bind=False)
        self.out = self.socket(zmq.PUSH, self.endpoints.results, bind=False)

    def step(self, ready: bool) -> None:
        if not ready:
            return
        frames, end = self.take(self.inputs_sock, keep=self.config.infer.max_batch)
        frames = [msg for msg in frames if self._acceptable(msg)]
        if frames:
            outputs = self.engine.infer(np.stack([msg.arrays[0] for msg in frames]))
            for i, msg in enumerate(frames):
                msg.header["outputs"] = self.output_names
                self.push(self.out, Message("result", msg.header,
                                            tuple(outputs[name][i] for name in self.output_names)))
        if end:
            self.send_eos(self.out)

    def _acceptable(self, msg: Message) -> bool:
        array = msg.arrays[0] if len(msg.arrays) == 1 else None
        if array is None or array.dtype != np.uint8 or array.shape != self.input_shape:
            self.counters["rejected"] += 1
            got = "no tensor" if array is None else f"{array.dtype}{list(array.shape)}"
            log.warning("infer: rejected frame %s: expected uint8%s, got %s",
                        msg.header.get("id"), list(self.input_shape), got)
            return False
        return True

    def describe(self) -> dict:
        return {"engine": self.engine.describe(), "selection": self.reason}

    def stop(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.close()
