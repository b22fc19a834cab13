"""Postprocess: head outputs -> events (PUB + journal) and per-frame latency rows for the supervisor."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zmq

from .events import EventSink, make_event
from .metrics import SEGMENTS, segment_row
from .stage import MAX_TAKE, Stage
from .wire import Message


class PostprocessStage(Stage):
    name = "postprocess"
    stamp_in = "post_in"
    stamp_out = "post_out"
    needs = ("outputs", "src")

    def acceptable(self, msg: Message) -> bool:
        if not super().acceptable(msg):
            return False
        if msg.header["outputs"] != self.output_names or len(msg.arrays) != len(self.output_names):
            self.reject(f"frame {msg.header['id']}: outputs {msg.header['outputs']!r} with "
                        f"{len(msg.arrays)} tensors, expected {self.output_names}")
            return False
        return True

    def start(self) -> None:
        self.output_names = list(self.bundle.outputs)
        self.results = self.socket(zmq.PULL, self.endpoints.results, bind=True,
                                   hwm=max(self.config.transport.hwm, self.config.infer.max_batch + 1))
        self.sink = EventSink(self.context, self.config.postprocess.events,
                              Path(self.endpoints.out) / "events.jsonl")
        self._rows: list[list[float]] = []

    def step(self, ready: bool) -> None:
        if not ready:
            return
        frames, end = self.take(self.results, keep=MAX_TAKE)
        for msg in frames:
            self._score(msg)
        if end:
            self.finished = True

    def _score(self, msg: Message) -> None:
        outputs = dict(zip(self.output_names, msg.arrays, strict=True))
        header = msg.header
        score = float(self.bundle.best_frame.score({k: v[None] for k, v in outputs.items()})[0])
        if self.config.postprocess.frame_events:
            self.sink.emit(make_event(
                "frame", self.endpoints.run_id, frame_id=header["id"], t_capture_ns=header["t"]["cap"],
                latency_ms=(time.monotonic_ns() - header["t"]["cap"]) / 1e6, score=round(score, 6),
                source_index=header["src"].get("index"), source=header["src"], heads=self._heads(outputs)))
        self.counters["scored"] += 1
        header["t"][self.stamp_out] = time.monotonic_ns()
        self._rows.append(segment_row(header["t"]))

    def _heads(self, outputs: dict[str, np.ndarray]) -> dict:
        """Small heads in readable form; masks and embeddings stay out of per-frame events."""
        heads = {}
        for name, spec in self.bundle.outputs.items():
            value = outputs[name]
            if spec.classes:
                heads[name] = {c: round(float(p), 6) for c, p in zip(spec.classes, value, strict=True)}
            elif value.size == 1:
                heads[name] = round(float(value), 6)
        return heads

    def report_arrays(self) -> tuple[np.ndarray, ...]:
        rows = np.asarray(self._rows, dtype=np.float64).reshape(-1, len(SEGMENTS))
        self._rows = []
        return (rows,)

    def describe(self) -> dict:
        return {"events": self.sink.bound}

    def stop(self) -> None:
        if getattr(self, "sink", None) is not None:
            self.sink.close()
