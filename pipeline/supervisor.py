"""The supervisor: owns the run (folder, private socket directory, frame ring), spawns the four stages,
hears their reports, prints the live status, and takes everything down cleanly on any exit path."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from engines.base import EngineError
from engines.bundle import Bundle, BundleError, load_bundle
from engines.registry import engine_class

from . import wire
from .capture import CaptureStage
from .config import Config, ConfigError, to_toml
from .console import EventView
from .infer import InferStage
from .metrics import BOUNDARIES, LatencyBook, LatencyHistogram, frame_accounting
from .postprocess import PostprocessStage
from .preprocess import PreprocessStage
from .ring import FrameRing
from .stage import Endpoints, Stage, run_stage
from .wire import Message

log = logging.getLogger("sweepstream")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DRAIN_EXIT_RESERVE_S = 0.3  # of the stop budget, kept for the stages to exit after draining

PIPELINE: tuple[type[Stage], ...] = (CaptureStage, PreprocessStage, InferStage, PostprocessStage)


@dataclass
class StageHandle:
    cls: type[Stage]
    process: multiprocessing.process.BaseProcess
    state: str = "spawned"  # spawned -> ready -> done, or failed
    last_seen: float = field(default_factory=time.monotonic)
    counters: dict[str, int] = field(default_factory=dict)
    describe: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.name


class StageFailure(RuntimeError):
    """A stage died, reported an error, hung, or never started; the message names it."""


@dataclass(frozen=True)
class Interval:
    """Throughput and end-to-end latency since a reader's last look: what a status line or a health
    event reports, each reader keeping its own pace."""

    seconds: float
    fps_in: float
    fps_out: float
    e2e: LatencyHistogram
    accounting: dict[str, Any]  # frame_accounting() of the stages' counters at this look

    @property
    def drops(self) -> dict[str, int]:
        boundaries = self.accounting["boundaries"]
        return {name: boundaries[name]["dropped"] for name in BOUNDARIES}


class Supervisor:
    def __init__(self, config: Config, stages: tuple[type[Stage], ...] = PIPELINE) -> None:
        self.config = config
        self.stage_classes = stages
        self.run_id = uuid.uuid4().hex[:12]
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.out = Path(config.run.out or Path("runs") / f"{stamp}-{self.run_id}")
        self.book = LatencyBook(skip=config.run.summary_skip, windows=("status", "health"))
        self._marks: dict[str, tuple[float, int, int]] = {}  # reader -> (time, frames read, frames scored)
        self.handles: dict[str, StageHandle] = {}
        self.stop_signal: str | None = None
        self.force_stop = False
        self.shutdown_deadline = math.inf
        self.error: str | None = None
        self.summary: dict[str, Any] = {}

    # -- the run -----------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run to the end of the source, a signal, or a failure. Returns the process exit code: 0 for a run
        that completed or was stopped by a signal, 1 when a stage failed, 2 for a bad configuration."""
        try:
            bundle = self._preflight()
        except ConfigError as exc:
            print(f"sweepstream: error: {exc}", file=sys.stderr)
            return 2
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.toml").write_text(to_toml(self.config))
        self.t_start = time.monotonic()
        self.t_go = self.t_end = None
        with contextlib.ExitStack() as cleanup:  # undone in reverse order, whatever happens
            previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
            cleanup.callback(_restore_signals, previous)
            socket_dir = tempfile.mkdtemp(prefix="sweepstream-")
            cleanup.callback(shutil.rmtree, socket_dir, ignore_errors=True)
            ring = FrameRing.create(self.config.ring.slots, int(self.config.ring.slot_mb * 2**20))
            cleanup.callback(ring.unlink)
            cleanup.callback(ring.close)
            context = self.context = zmq.Context()
            cleanup.callback(context.term)
            self.control = context.socket(zmq.ROUTER)
            cleanup.callback(self.control.close)
            self.control.setsockopt(zmq.LINGER, 0)
            self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
            endpoints = Endpoints(
                control=f"ipc://{socket_dir}/control", frames=f"ipc://{socket_dir}/frames",
                inputs=f"ipc://{socket_dir}/inputs", results=f"ipc://{socket_dir}/results",
                ring=ring.name, out=str(self.out), run_id=self.run_id, supervisor_pid=os.getpid(),
                socket_dir=socket_dir)
            self.control.bind(endpoints.control)
            cleanup.callback(self._take_down)
            try:
                # Blocked while spawning, so children start with them blocked (and ignore them from their
                # first line on), while one that arrives meanwhile waits for this process, not lost.
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                try:
                    self._spawn(endpoints, bundle)
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                self._supervise()
            except StageFailure as exc:
                self.error = str(exc)
            self.t_end = self.t_end or time.monotonic()
        self._write_summary()
        if self.error:
            print(f"sweepstream: {self.error}", file=sys.stderr)
            return 1
        return 0

    def _preflight(self) -> Bundle:
        """Everything that can be checked before a process starts: the bundle (loaded and verified once,
        then handed to every stage), the engine asked for, and a run folder that holds no earlier run."""
        try:
            bundle = load_bundle(self.config.infer.bundle)
        except BundleError as exc:
            raise ConfigError(f"infer.bundle: {exc}") from None
        if self.config.infer.engine != "auto":
            try:
                engine_class(self.config.infer.engine)
            except EngineError as exc:
                raise ConfigError(f"infer.engine: {exc}") from None
        if (self.out / "events.jsonl").exists():
            raise ConfigError(f"run.out: {self.out} already holds a run (events.jsonl); "
                              "choose another folder")
        return bundle

    def _spawn(self, endpoints: Endpoints, bundle: Bundle) -> None:
        spawn = multiprocessing.get_context("spawn")
        for cls in self.stage_classes:
            process = spawn.Process(target=run_stage, args=(cls, self.config, endpoints, bundle),
                                    name=f"sweepstream-{cls.name}", daemon=True)
            process.start()
            self.handles[cls.name] = StageHandle(cls, process)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop waiting for the drain
            self.force_stop = True
        else:
            self.shutdown_deadline = time.monotonic() + self.config.run.stop_timeout
        self.stop_signal = signal.Signals(signum).name

    def _supervise(self) -> None:
        cfg = self.config.run
        draining = False
        next_status = time.monotonic() + cfg.status_interval
        next_health = math.inf  # from the go on
        while not all(h.state == "done" for h in self.handles.values()):
            if self.control.poll(50):
                self._receive()
            now = time.monotonic()
            self._check_health(now)
            if self.stop_signal and self.t_go is None:
                log.info("%s before the pipeline started: stopping", self.stop_signal)
                break  # no frame has moved, so there is nothing to drain
            if self.t_go is None and all(h.state in ("ready", "done") for h in self.handles.values()):
                self.t_go = now
                next_health = now + cfg.health_interval
                events = self.handles["postprocess"].describe.get("events") if not cfg.quiet else None
                if events:
                    self._view = EventView(self.context, events)
                self._command(self.stage_classes[0].name, "go")
            if self._view is not None:
                for line in self._view.lines():
                    self._print_line(line)
            if self.stop_signal and not draining:
                log.info("%s: draining the pipeline", self.stop_signal)
                draining = True
                self._command(self.stage_classes[0].name, "drain")
            if self.force_stop:
                log.warning("second %s: stopping without draining", self.stop_signal)
                break
            if draining and now > self.shutdown_deadline - DRAIN_EXIT_RESERVE_S:
                stuck = [h.name for h in self.handles.values() if h.state != "done"]
                log.warning("stages did not drain within %.1f s: %s", cfg.stop_timeout, ", ".join(stuck))
                break
            if not cfg.quiet and now >= next_status:
                next_status = now + cfg.status_interval
                self._print_status(now)
            if cfg.health_interval and now >= next_health:
                next_health = now + cfg.health_interval
                self._send_health(now)
        self.t_end = time.monotonic()

    def _receive(self) -> None:
        while True:
            try:
                routed = wire.recv_routed(self.control)
            except wire.WireError as exc:
                log.warning("control: rejected a message: %s", exc)
                continue
            if routed is None:
                return
            name = routed[0].decode(errors="replace")
            if name not in self.handles:
                log.warning("control: message from unknown peer %r", name)
                continue
            self._handle(self.handles[name], routed[1])

    def _handle(self, handle: StageHandle, msg: Message) -> None:
        handle.last_seen = time.monotonic()
        if msg.kind == "ready":
            handle.state = "ready"
            handle.describe = msg.header.get("describe", {})
        elif msg.kind in ("report", "done"):
            handle.counters = msg.header.get("counters", {})
            for rows in msg.arrays:
                self.book.add_rows(rows)
            if msg.kind == "done":
                handle.state = "done"
        elif msg.kind == "error":
            handle.state = "failed"
            raise StageFailure(f"stage '{handle.name}' failed: {msg.header.get('message', 'unknown error')}")

    def _check_health(self, now: float) -> None:
        cfg = self.config.run
        for handle in self.handles.values():
            code = handle.process.exitcode
            if code is not None and handle.state != "done":
                if self.control.poll(0):  # its last words may still be in flight
                    self._receive()
                    continue
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                raise StageFailure(f"stage '{handle.name}' {how}")
            limit = cfg.start_timeout if handle.state == "spawned" else cfg.stall_timeout
            if handle.state in ("spawned", "ready") and now - handle.last_seen > limit:
                what = "did not start" if handle.state == "spawned" else "stalled (no report)"
                raise StageFailure(f"stage '{handle.name}' {what} within {limit:.0f} s")

    def _command(self, name: str, kind: str, header: dict[str, Any] | None = None) -> None:
        try:
            wire.send(self.control, Message(kind, header or {}), to=name.encode())
        except zmq.ZMQError as exc:  # the stage is gone or not yet connected; its exit is handled elsewhere
            log.debug("control: %s to %s not delivered: %s", kind, name, exc)

    def _take_down(self) -> None:
        """Every stage ends: asked first, killed at the shutdown deadline. Nothing outlives the supervisor.
        (Stages ignore SIGTERM, so that a signal to the whole process group reaches only the supervisor.)"""
        if self._view is not None:
            for line in self._view.lines():
                self._print_line(line)
            self._view.close()
            self._view = None
        for handle in self.handles.values():
            if handle.process.is_alive():
                self._command(handle.name, "exit")
        deadline = min(self.shutdown_deadline, time.monotonic() + self.config.run.stop_timeout)
        deadline = max(deadline, time.monotonic() + DRAIN_EXIT_RESERVE_S)
        for handle in self.handles.values():
            handle.process.join(max(0.0, deadline - time.monotonic()))
        for handle in self.handles.values():
            if handle.process.is_alive():
                log.warning("stage '%s' did not exit in time; killing it", handle.name)
                handle.process.kill()
                handle.process.join()
        if self._status_open:
            print(file=sys.stderr)

    # -- status and summary ------------------------------------------------------------------------------
    _status_open = False
    _view: EventView | None = None

    def _print_line(self, line: str) -> None:
        """An event line above the status line (which a terminal keeps rewriting in place)."""
        if self._status_open:
            print("\r\033[K", end="", file=sys.stderr)
            self._status_open = False
        print(line, file=sys.stderr, flush=True)

    def _counters(self) -> dict[str, dict[str, int]]:
        return {name: handle.counters for name, handle in self.handles.items()}

    def _send_health(self, now: float) -> None:
        """The pipeline's vital signs since the last health event, for postprocess to publish as a
        `health` event (subscribers see the same figures as the status line, without a terminal)."""
        if self.handles["postprocess"].state != "ready":
            return
        interval = self._interval("health", now)
        e2e = interval.e2e

        def ms(value: float) -> float | None:
            return round(value, 3) if e2e.count else None
        self._command("postprocess", "health", {
            "uptime_s": round(now - self.t_go, 3),
            "interval_s": round(interval.seconds, 3),
            "fps_in": round(interval.fps_in, 2),
            "fps_out": round(interval.fps_out, 2),
            "e2e_ms": {"count": e2e.count, "p50": ms(e2e.percentile(50)), "p99": ms(e2e.percentile(99)),
                       "max": ms(e2e.max)},
            "frames": {k: interval.accounting[k] for k in ("read", "scored", "dropped")},
            "drops": interval.drops,
            "stages": {name: handle.state for name, handle in self.handles.items()},
        })

    def _interval(self, reader: str, now: float) -> Interval:
        counters = self._counters()
        read = counters.get("capture", {}).get("read", 0)
        scored = counters.get("postprocess", {}).get("scored", 0)
        then, read_then, scored_then = self._marks.get(reader, (self.t_go or self.t_start, 0, 0))
        self._marks[reader] = (now, read, scored)
        span = max(now - then, 1e-9)
        return Interval(span, (read - read_then) / span, (scored - scored_then) / span,
                        self.book.take_window(reader), frame_accounting(counters))

    def _print_status(self, now: float) -> None:
        interval = self._interval("status", now)
        drop_text = " ".join(f"{name} {count}" for name, count in interval.drops.items())
        line = (f"[{now - self.t_start:7.1f}s] in {interval.fps_in:6.1f} fps  "
                f"out {interval.fps_out:6.1f} fps  e2e p50 {interval.e2e.percentile(50):6.1f} ms  "
                f"p99 {interval.e2e.percentile(99):6.1f} ms  drops {drop_text}")
        if sys.stderr.isatty():
            print("\r" + line, end="", file=sys.stderr, flush=True)
            self._status_open = True
        else:
            print(line, file=sys.stderr, flush=True)

    def _write_summary(self) -> None:
        accounting = frame_accounting(self._counters())
        active = (self.t_end - self.t_go) if self.t_go is not None else 0.0
        outcome = "failed" if self.error else ("interrupted" if self.stop_signal else "completed")
        self.summary = {
            "run_id": self.run_id,
            "outcome": outcome,
            "error": self.error,
            "signal": self.stop_signal,
            "duration_s": round(active, 3),
            "throughput_fps": round(accounting["scored"] / active, 2) if active > 0 else 0.0,
            "frames": accounting,
            "latency_ms": self.book.summary(),
            "latency_skip_frames": self.book.skip,
            "stages": {name: {"counters": h.counters, **h.describe} for name, h in self.handles.items()},
            "config": self.config.as_dict(),
        }
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=_json_default))
        if not self.config.run.quiet:
            print(format_summary(self.summary, self.out), file=sys.stderr)


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def format_summary(summary: dict, out: Path) -> str:
    frames = summary["frames"]
    lines = [f"run {summary['run_id']} {summary['outcome']}: {frames['read']} frames read, "
             f"{frames['scored']} scored, {frames['dropped']} dropped, "
             f"{summary['throughput_fps']} fps over {summary['duration_s']} s"]
    lines.append(f"  {'latency ms':<20}" + "".join(f"{k:>9}" for k in ("p50", "p90", "p95", "p99", "max")))
    for name, stats in summary["latency_ms"].items():
        if stats.get("count"):
            values = "".join(f"{stats[k]:>9.2f}" for k in ("p50", "p90", "p95", "p99", "max"))
            lines.append(f"  {name:<20}{values}")
    for name, boundary in frames["boundaries"].items():
        lines.append(f"  {name:<20} sent {boundary['sent']}, dropped {boundary['dropped']}")
    lines.append(f"  written to {out}/summary.json and {out}/events.jsonl")
    return "\n".join(lines)
