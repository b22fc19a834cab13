"""Postprocess: head outputs -> sweep analysis -> events (PUB + journal), best-frame PNGs, and per-frame
latency rows for the supervisor. Operators may delimit sweeps by hand on a REP control socket.

Events are written by one writer thread, in order: measuring a best frame and saving its PNGs costs tens of
ms, which would otherwise stall the frames behind it (OpenCV and zlib release the GIL). The thread alone
uses the PUB socket and the journal; the frame path only hands it work."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from .analysis import AnalyzedFrame, Finding, SweepAnalyzer, resolve
from .events import EventSink, make_event
from .metrics import SEGMENTS, segment_row
from .ring import FrameRing
from .stage import MAX_TAKE, Stage
from .sweep import OPERATOR_COMMANDS, FrameInfo
from .wire import Message

log = logging.getLogger("sweepstream")
BEST_DIR = "best"
MAX_PENDING_WRITES = 256  # the frame path waits for the writer beyond this many batches


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
        self.mask_output = next((n for n, spec in self.bundle.outputs.items() if spec.kind == "mask"), None)
        self.ring = FrameRing.attach(self.endpoints.ring)
        self.results = self.socket(zmq.PULL, self.endpoints.results, bind=True,
                                   hwm=max(self.config.transport.hwm, self.config.infer.max_batch + 1))
        self.operator = None
        if self.config.postprocess.control is not None:
            self.operator = self.context.socket(zmq.REP)
            self.operator.setsockopt(zmq.LINGER, 0)
            try:
                self.operator.bind(self.config.postprocess.control)
            except zmq.ZMQError as exc:
                self.operator.close()
                raise RuntimeError(f"control endpoint {self.config.postprocess.control}: cannot bind: "
                                   f"{exc}") from None
            self.inputs.append(self.operator)
            self._sockets.append(self.operator)
        self.sink = EventSink(self.context, self.config.postprocess.events,
                              Path(self.endpoints.out) / "events.jsonl")
        self.best_dir = Path(self.endpoints.out) / BEST_DIR if self.config.postprocess.best_frames else None
        self.analyzer = SweepAnalyzer(self.config.sweep.for_bundle(self.bundle.best_frame.min_score))
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postprocess-events")
        self._writes: deque[Future] = deque()
        self._last_t: float | None = None
        self._flushed = False
        self._rows: list[list[float]] = []

    def step(self, ready: bool) -> None:
        if not ready:
            return
        self._serve_operator()
        frames, end = self.take(self.results, keep=MAX_TAKE)
        for msg in frames:
            self._score(msg)
        if end:
            self._flush()
            self.finished = True

    def _score(self, msg: Message) -> None:
        outputs = dict(zip(self.output_names, msg.arrays, strict=True))
        header = msg.header
        source = header["src"]
        score = float(self.bundle.best_frame.score({k: v[None] for k, v in outputs.items()})[0])
        findings = self._analyze(header, outputs, score)
        frame_event = None
        if self.config.postprocess.frame_events:
            cap = header["t"]["cap"]
            frame_event = (make_event(
                "frame", self.endpoints.run_id, sweep_id=self.analyzer.tracker.sweep_id,
                frame_id=header["id"], t_capture_ns=cap, latency_ms=(time.monotonic_ns() - cap) / 1e6,
                score=round(score, 6),
                content=round(float(header.get("content", 1.0)), 4), source_index=source.get("index"),
                source=source, heads=self._heads(outputs)))
        self._write(findings, header["t"]["cap"], frame_event)
        self.counters["scored"] += 1
        header["t"][self.stamp_out] = time.monotonic_ns()
        self._rows.append(segment_row(header["t"]))

    def _analyze(self, header: dict[str, Any], outputs: dict[str, np.ndarray], score: float) -> list[Finding]:
        source = header["src"]
        # Source time when the source has one: a flooded recording keeps its real pacing for gap rules.
        pts = source.get("pts")
        self._last_t = t = pts if isinstance(pts, (int, float)) else header["t"]["cap"] / 1e9
        spacing = source.get("pixel_spacing_mm") or self.config.postprocess.pixel_spacing_mm
        frame = AnalyzedFrame(
            info=FrameInfo(header["id"], t, score, float(header.get("content", 1.0)), source),
            t_capture_ns=header["t"]["cap"],
            mask=None if self.mask_output is None else outputs[self.mask_output],
            geometry=header.get("geom") or {}, frame_shape=tuple(header.get("shape", ())),
            spacing_mm=None if spacing is None else (float(spacing[0]), float(spacing[1])))
        image = self.ring.read(header["slot"], header["seq"]) if self._slot_ok(header) else None
        findings = self.analyzer.add(frame, image)
        self.ring.mark_released(header["id"])
        self.counters["best_image_missed"] = self.analyzer.images_missed
        return findings

    def _write(self, findings: list[Finding], trigger_ns: int | None, frame_event: dict | None = None
               ) -> None:
        """Hand events to the writer thread; a failure there fails the stage here, at the next write."""
        if not findings and frame_event is None:
            return
        self._writes.append(self.writer.submit(self._publish_all, findings, trigger_ns, frame_event))
        while self._writes and (self._writes[0].done() or len(self._writes) > MAX_PENDING_WRITES):
            self._writes.popleft().result()

    def _wait_for_writes(self) -> None:
        while self._writes:
            self._writes.popleft().result()

    def _publish_all(self, findings: list[Finding], trigger_ns: int | None, frame_event: dict | None) -> None:
        for finding in resolve(findings):
            self._publish(finding, trigger_ns)
        if frame_event is not None:
            self.sink.emit(frame_event)

    def _slot_ok(self, header: dict[str, Any]) -> bool:
        slot, seq = header.get("slot"), header.get("seq")
        return type(slot) is int and type(seq) is int and 0 <= slot < self.ring.slots

    def _publish(self, finding: Finding, trigger_ns: int | None) -> None:
        fields = dict(finding.fields)
        if self.best_dir is not None and finding.images:
            self.best_dir.mkdir(exist_ok=True)
            stem = f"sweep-{finding.sweep_id:04d}-frame-{finding.frame_id:06d}"
            for name, image in finding.images.items():
                path = self.best_dir / f"{stem}-{name}.png"
                # Fastest zlib level: a 562 x 744 frame in a few ms instead of tens, at 10-20 % more bytes.
                if not cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
                    log.warning("postprocess: could not write %s", path)
                    continue
                fields[f"{name}_png"] = f"{BEST_DIR}/{path.name}"
        latency = None if trigger_ns is None else (time.monotonic_ns() - trigger_ns) / 1e6
        self.sink.emit(make_event(finding.type, self.endpoints.run_id, sweep_id=finding.sweep_id,
                                  frame_id=finding.frame_id, t_capture_ns=finding.t_capture_ns,
                                  latency_ms=latency, **fields))

    def on_control(self, msg: Message) -> None:
        if msg.kind != "health":
            super().on_control(msg)
            return
        event = make_event("health", self.endpoints.run_id, sweep_id=self.analyzer.tracker.sweep_id,
                           **msg.header)
        self._writes.append(self.writer.submit(self.sink.emit, event))

    def _serve_operator(self) -> None:
        while self.operator is not None:
            try:
                request = self.operator.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.operator.send_json(self._command(request))

    def _command(self, request: bytes) -> dict[str, Any]:
        """`{"command": "start"}` or `{"command": "stop"}` (a bare word works too) -> a JSON reply."""
        try:
            text = request.decode()
            parsed = json.loads(text) if text.lstrip().startswith("{") else {"command": text.strip()}
            name = parsed.get("command") if isinstance(parsed, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            name = None
        if name not in OPERATOR_COMMANDS:
            self.counters["operator_rejected"] += 1
            return {"ok": False, "error": f"expected {{\"command\": one of {list(OPERATOR_COMMANDS)}}}"}
        t = self._last_t if self._last_t is not None else time.monotonic()
        self._write(self.analyzer.command(name, t), None)
        self.counters[f"operator_{name}"] += 1
        return {"ok": True, "command": name, "sweep_id": self.analyzer.tracker.sweep_id}

    def _flush(self) -> None:
        if self._flushed:
            return
        self._flushed = True
        t = self._last_t if self._last_t is not None else time.monotonic()
        self._write(self.analyzer.flush(t), None)
        self._wait_for_writes()

    def _heads(self, outputs: dict[str, np.ndarray]) -> dict:
        """Small heads in readable form; a mask as the share of pixels marked; embeddings stay out."""
        heads = {}
        for name, spec in self.bundle.outputs.items():
            value = outputs[name]
            if spec.classes:
                heads[name] = {c: round(float(p), 6) for c, p in zip(spec.classes, value, strict=True)}
            elif value.size == 1:
                heads[name] = round(float(value), 6)
            elif spec.kind == "mask":  # the share of the model input marked: enough to say "abdomen seen"
                heads[name] = round(float(np.count_nonzero(value)) / value.size, 6)
        return heads

    def report_arrays(self) -> tuple[np.ndarray, ...]:
        rows = np.asarray(self._rows, dtype=np.float64).reshape(-1, len(SEGMENTS))
        self._rows = []
        return (rows,)

    def describe(self) -> dict:
        control = None if self.operator is None else self.operator.getsockopt(zmq.LAST_ENDPOINT).decode()
        return {"events": self.sink.bound, "control": control}

    def stop(self) -> None:
        if getattr(self, "sink", None) is not None:
            if getattr(self, "writer", None) is not None:
                try:  # stopped before the end of stream: the open sweep still gets its final
                    self._flush()
                except Exception as exc:  # noqa: BLE001 - stopping must release the journal regardless
                    log.warning("postprocess: could not close the open sweep: %s", exc)
                self.writer.shutdown(wait=True)
            self.sink.close()
        if getattr(self, "ring", None) is not None:
            self.ring.close()
