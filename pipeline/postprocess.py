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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from engines.bundle import Bundle

from . import wire
from .analysis import Finding, SweepAnalyzer, resolve
from .annotate import with_annotations, write_png
from .events import EventSink, iter_journal, make_event
from .exam import ExamRecorder
from .messages import Kind, RefineRequest, Result, kind_of
from .metrics import SEGMENTS, segment_row
from .preview import PreviewFeed
from .recovery import Recovered, recover
from .ring import FrameRing
from .stage import MAX_TAKE, Stage
from .steps import analyzed_frame, frame_score, output_problem
from .sweep import EXAM_END, OPERATOR_COMMANDS
from .wire import Message

log = logging.getLogger("sweepstream")
BEST_DIR = "best"
REFINE_POLL_MS = 20  # how often a refining postprocess looks at its waiting finals without new results
REFINE_REQUEST_FRAMES = 16  # frames asked for at once, most wanted first
# Planned frames whose full-resolution image is copied while the ring (about 1 s) still holds it: the
# search around a sweep's top frames reaches 8 either side, and any of them may become the best frame.
REFINE_COPY_FRAMES = 40
REFINE_MARGIN_NS = 200_000_000  # frames this close to leaving preprocess's history are not asked for
MAX_PENDING_WRITES = 256  # the frame path waits for the writer beyond this many batches


@dataclass(frozen=True)
class _Scorer:
    """A results link and the bundle whose outputs it carries. `screens`: the screening cascade's screen
    model, whose scores delimit sweeps and guide refinement but never pick or measure a best frame."""

    socket: zmq.Socket
    bundle: Bundle
    screens: bool

    @property
    def outputs(self) -> list[str]:
        return list(self.bundle.outputs)

    @property
    def mask_output(self) -> str | None:
        if self.screens:
            return None
        return next((n for n, spec in self.bundle.outputs.items() if spec.kind == "mask"), None)


class PostprocessStage(Stage):
    """Links: results links in (Result: `results`, and `screened` in a screening cascade), `refine` out.
    Also binds the events PUB (`postprocess.events`) and the operator's REP (`postprocess.control`), which
    face the outside, not another stage."""

    stamp_in = "post_in"
    stamp_out = "post_out"

    def acceptable(self, hop: Result) -> bool:
        problem = output_problem(self._taking.bundle, hop.outputs)
        if problem is not None:
            self.reject(f"frame {hop.frame.id}: {problem}")
            return False
        return True

    def start(self) -> None:
        graph = self.wiring.graph
        self.ring = FrameRing.attach(self.wiring.ring)
        self.scorers = [_Scorer(self.open(link.name), self.bundles[graph.stage(link.sender).bundle],
                                screens=graph.stage(link.sender).bundle == "screen")
                        for link in graph.links_into(self.name, Kind.RESULT)]
        self._taking = self.scorers[0]
        self._open_links = len(self.scorers)
        self.operator = None
        if self.config.postprocess.control is not None:
            self.operator = self.context.socket(zmq.REP)
            self.operator.setsockopt(zmq.LINGER, 0)
            self.security.secure(self.operator)  # Curve when the run has keys, even on loopback
            try:
                self.operator.bind(self.config.postprocess.control)
            except zmq.ZMQError as exc:
                self.operator.close()
                raise RuntimeError(f"control endpoint {self.config.postprocess.control}: cannot bind: "
                                   f"{exc}") from None
            self.inputs.append(self.operator)
            self._sockets.append(self.operator)
        journal = Path(self.wiring.out) / "events.jsonl"
        restarted = self.life > 0 and journal.exists()  # the last life's journal is read back, streamed
        recovered = recover(iter_journal(journal)) if restarted else Recovered()
        self._published = recovered.published  # frames already in the journal: never published twice
        self._stream_from = recovered.last_frame_id  # newest-path frames up to here were the last life's
        self._open_from = recovered.open_from  # refined frames before this belong to sweeps already ended
        self.best_dir = Path(self.wiring.out) / BEST_DIR if self.config.postprocess.best_frames else None
        self.sink = ExamRecorder(EventSink(self.context, self.config.postprocess.events, journal,
                                           fsync=self.config.postprocess.fsync, secure=self.security.secure),
                                 self.wiring.run_id, Path(self.wiring.out), self.best_dir)
        self.sink.replay(iter_journal(journal) if restarted else [])
        self._unsaved: str | None = None  # why best-frame images cannot be written, once they cannot
        run = self.config.run
        self.preview = None if run.viewer is None else PreviewFeed.open(self.context, run.viewer_preview_fps)
        infer = self.config.infer
        self.refining = infer.refine != "off"
        self.analyzer = SweepAnalyzer(self.config.sweep.for_bundle(self.bundle.best_frame.min_score),
                                      refine=self.refining,
                                      screened=any(scorer.screens for scorer in self.scorers))
        self.requests = self.open("refine") if self.refining else None
        self._window_ns = int(infer.refine_window_s * 1e9)
        self._timeout_ns = int(infer.refine_timeout_s * 1e9)
        self._plan: list[int] = []
        self._plan_scored = 0
        if self.refining:
            self.poll_ms = REFINE_POLL_MS
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postprocess-events")
        self._writes: deque[Future] = deque()
        if self.life:
            self._write(self.analyzer.resume(recovered), None)
            log.info("postprocess: restarted; took back %d open sweep(s) and %d published frames from the "
                     "journal", len(recovered.open), len(recovered.published))
        self._last_t: float | None = None
        self._flushed = False
        self._rows: list[list[float]] = []
        self._refined_rows: list[list[float]] = []

    def step(self, ready: bool) -> None:
        if ready:
            self._serve_operator()
            for scorer in self.scorers:
                self._taking = scorer
                frames, end = self.take(scorer.socket, keep=MAX_TAKE)
                for result in frames:
                    self._score(result, scorer)
                self._open_links -= end
            if not self._open_links:
                self._flush()
                self.finished = True
                return
        if self.refining:
            self._refine()

    def _score(self, result: Result, scorer: _Scorer) -> None:
        seen = time.monotonic_ns()
        frame = result.frame
        if frame.id <= self._stream_from and (not result.refined or frame.id < self._open_from):
            return  # the last life of this stage saw it, or its sweep ended then (a restart)
        score = frame_score(scorer.bundle, result.outputs)
        analyzed = analyzed_frame(result, score, scorer.mask_output, self.config.postprocess.pixel_spacing_mm)
        view = self.ring.borrow(frame.slot, frame.seq) if 0 <= frame.slot < self.ring.slots else None
        findings = self.analyzer.add(analyzed, view, refined=result.refined, screened=scorer.screens)
        if view is not None and not self.ring.valid(frame.slot, frame.seq):
            self.analyzer.discard_image(frame.id)
        elif view is not None and self.preview is not None and not result.refined:
            self.preview.offer(analyzed, view)
        del view
        if result.refined:  # an older frame: the ring's marks and the stream's clock stay where they are
            self.counters["refined"] += 1
            sweep_id = self.analyzer.tracker.sweep_of(frame.id)
        else:
            self._last_t = analyzed.info.t
            self.ring.mark_released(frame.id)
            self.counters["scored"] += 1
            sweep_id = self.analyzer.tracker.sweep_id
        self.counters["best_image_missed"] = self.analyzer.images_missed
        frame_event = None
        if self.config.postprocess.frame_events and frame.id not in self._published:
            cap = frame.stamps["cap"]
            frame_event = make_event(
                "frame", self.wiring.run_id, sweep_id=sweep_id, frame_id=frame.id,
                t_capture_ns=cap, latency_ms=(time.monotonic_ns() - cap) / 1e6, score=round(score, 6),
                content=round(result.content, 4), source_index=frame.source["index"], source=frame.source,
                refined=result.refined, model=scorer.bundle.name,
                heads=self._heads(scorer.bundle, result.outputs))
        self._write(findings, frame.stamps["cap"], frame_event, seen)
        frame.stamps[self.stamp_out] = time.monotonic_ns()
        (self._refined_rows if result.refined else self._rows).append(segment_row(frame.stamps))

    def _refine(self) -> None:
        """Finals whose refinement is done (or timed out), then the frames to refine next: asked of
        preprocess, and their full-resolution images copied while the ring still has them."""
        now = time.monotonic_ns()
        held_since = now - self._window_ns + REFINE_MARGIN_NS
        finals = self.analyzer.due_finals(now, held_since, self._timeout_ns)
        if finals:
            self._write(finals, None, None, now)
        candidates = self.analyzer.refine_plan(held_since, REFINE_COPY_FRAMES)
        plan = candidates[:REFINE_REQUEST_FRAMES]
        for frame_id in candidates:
            if self.analyzer.wants_image(frame_id) and (found := self.ring.find(frame_id)) is not None:
                view = self.ring.borrow(*found)
                if view is not None:
                    self.analyzer.hold_candidate(frame_id, view)
                    if not self.ring.valid(*found):
                        self.analyzer.discard_candidate(frame_id)
                    del view
        scored = self.counters["refined"]
        if plan != self._plan or scored != self._plan_scored:
            request = RefineRequest(tuple(plan), scored)
            if wire.send(self.requests, request.message()):
                self._plan, self._plan_scored = plan, scored
            else:
                self.counters["refine_requests_lost"] += 1

    def _write(self, findings: list[Finding], trigger_ns: int | None, frame_event: dict | None = None,
               decided_ns: int | None = None) -> None:
        """Hand events to the writer thread; a failure there fails the stage here, at the next write.
        `decided_ns`: when the pipeline knew what these findings say (a final best_frame's `decision_ms`
        counts from its sweep's end when it was held for refinement, else from then)."""
        if not findings and frame_event is None:
            return
        decided_ns = time.monotonic_ns() if decided_ns is None else decided_ns
        self._writes.append(self.writer.submit(self._publish_all, findings, trigger_ns, frame_event,
                                               decided_ns))
        while self._writes and (self._writes[0].done() or len(self._writes) > MAX_PENDING_WRITES):
            self._writes.popleft().result()

    def _wait_for_writes(self) -> None:
        while self._writes:
            self._writes.popleft().result()

    def _publish_all(self, findings: list[Finding], trigger_ns: int | None, frame_event: dict | None,
                     decided_ns: int) -> None:
        for finding in with_annotations(resolve(findings)):
            self._publish(finding, trigger_ns, decided_ns)
        if frame_event is not None:
            self.sink.emit(frame_event)

    def _publish(self, finding: Finding, trigger_ns: int | None, decided_ns: int) -> None:
        fields = dict(finding.fields)
        if self.best_dir is not None and finding.images:
            try:
                self.best_dir.mkdir(exist_ok=True)
            except OSError as exc:
                self._not_saving(self.best_dir, exc)
            stem = f"sweep-{finding.sweep_id:04d}-frame-{finding.frame_id:06d}"
            for name, image in finding.images.items():
                path = self.best_dir / f"{stem}-{name}.png"
                try:
                    write_png(path, image)
                except OSError as exc:
                    self._not_saving(path, exc)
                    continue
                fields[f"{name}_png"] = f"{BEST_DIR}/{path.name}"
        now = time.monotonic_ns()
        latency = None if trigger_ns is None else (now - trigger_ns) / 1e6
        if finding.type == "best_frame" and fields.get("final"):
            since = decided_ns if finding.ended_ns is None else finding.ended_ns
            fields["decision_ms"] = round((now - since) / 1e6, 3)
        self.sink.emit(make_event(finding.type, self.wiring.run_id, sweep_id=finding.sweep_id,
                                  frame_id=finding.frame_id, t_capture_ns=finding.t_capture_ns,
                                  latency_ms=latency, **fields))

    def on_control(self, msg: Message) -> None:
        if kind_of(msg) is not Kind.HEALTH:
            super().on_control(msg)
            return
        event = make_event("health", self.wiring.run_id, sweep_id=self.analyzer.tracker.sweep_id,
                           **msg.header, **self._recording())
        self._writes.append(self.writer.submit(self.sink.emit, event))

    def _not_saving(self, path: Path, exc: OSError) -> None:
        """A best-frame image that cannot be written: said once in the log, then in every health event;
        the stream and the events go on."""
        if self._unsaved is None:
            self._unsaved = f"best frames {path}: {exc.strerror or exc}"
            log.error("postprocess: not saving best-frame images: %s (events are still published)",
                      self._unsaved)

    def _recording(self) -> dict[str, Any]:
        """What health says about recording: whether the journal and the best-frame images are written."""
        problems = [p for p in (self.sink.not_recording, self._unsaved) if p]
        return {"recording": not problems, **({"not_recording": "; ".join(problems)} if problems else {})}

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
        if name == EXAM_END:
            self._writes.append(self.writer.submit(self.sink.end_exam))
            self.counters[f"operator_{name}"] += 1
            return {"ok": True, "command": name, "sweep_id": self.analyzer.tracker.sweep_id}
        if name not in OPERATOR_COMMANDS:
            self.counters["operator_rejected"] += 1
            commands = [*OPERATOR_COMMANDS, EXAM_END]
            return {"ok": False, "error": f"expected {{\"command\": one of {commands}}}"}
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
        self._writes.append(self.writer.submit(self.sink.finish))
        self._wait_for_writes()

    def _heads(self, bundle: Bundle, outputs: dict[str, np.ndarray]) -> dict:
        """Small heads in readable form; a mask as the share of pixels marked; embeddings stay out."""
        heads = {}
        for name, spec in bundle.outputs.items():
            value = outputs[name]
            if spec.classes:
                heads[name] = {c: round(float(p), 6) for c, p in zip(spec.classes, value, strict=True)}
            elif value.size == 1:
                heads[name] = round(float(value), 6)
            elif spec.kind == "mask":  # the share of the model input marked: enough to say "abdomen seen"
                heads[name] = round(float(np.count_nonzero(value)) / value.size, 6)
        return heads

    def report_arrays(self) -> tuple[np.ndarray, ...]:
        """Latency rows of the newest-path frames, then of the refined ones (reported apart: a refined
        frame is scored seconds after its capture by design)."""
        rows = np.asarray(self._rows, dtype=np.float64).reshape(-1, len(SEGMENTS))
        refined = np.asarray(self._refined_rows, dtype=np.float64).reshape(-1, len(SEGMENTS))
        self._rows, self._refined_rows = [], []
        return rows, refined

    def describe(self) -> dict:
        control = None if self.operator is None else self.operator.getsockopt(zmq.LAST_ENDPOINT).decode()
        return {"events": self.sink.bound, "control": control, "curve": self.security.enabled,
                "preview": None if self.preview is None else self.preview.bound}

    def status(self) -> dict:
        """Nothing beyond the counters; the peers refused on the events and operator sockets are one."""
        self.counters["refused"] = self.security.count_refused()
        return {}

    def stop(self) -> None:
        """Stopped before the end of stream: the open sweep still gets its final events. If they cannot be
        written the stage fails (the run exits 1 naming it), after the journal is closed either way."""
        try:
            if getattr(self, "writer", None) is not None:
                try:
                    self._flush()
                finally:
                    self.writer.shutdown(wait=True)
        finally:
            if getattr(self, "sink", None) is not None:
                self.sink.close()
            if getattr(self, "preview", None) is not None:
                self.preview.close()
            if getattr(self, "ring", None) is not None:
                self.ring.close()
