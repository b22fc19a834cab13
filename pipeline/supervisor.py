"""The supervisor: owns the run (folder, private socket directory, frame ring), spawns the stages the graph
declares, hears their reports, and takes everything down cleanly on any exit path. What the run tells
about itself (status line, health events, summary) is `telemetry`'s."""

from __future__ import annotations

import contextlib
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

import zmq

from engines.base import EngineError
from engines.bundle import Bundle, BundleError, load_bundle

from . import wire
from .config import Config, ConfigError, to_toml
from .console import EventView
from .graph import Graph, Wiring, pipeline_graph
from .messages import Kind, control, kind_of
from .ring import FrameRing
from .security import ClientKeys, console_keys
from .stage import run_stage
from .steps import preflight_engine
from .telemetry import Telemetry, format_summary, write_summary
from .viewer import Viewer, open_viewer
from .wire import Message

log = logging.getLogger("sweepstream")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DRAIN_EXIT_RESERVE_S = 0.3  # of the stop budget, kept for the stages to exit after draining


RESTART_BACKOFF_MAX_S = 8.0


@dataclass
class StageHandle:
    stage: str  # the stage in the graph
    instance: str  # this process's name (stage, or stage-i for a replica)
    process: multiprocessing.process.BaseProcess
    state: str = "spawned"  # spawned -> ready -> done, or failed; restarting while it waits for a new life
    last_seen: float = field(default_factory=time.monotonic)
    describe: dict[str, Any] = field(default_factory=dict)
    life: int = 0  # 0 for the first process, then one more per restart
    restarted_at: list[float] = field(default_factory=list)  # monotonic times of its restarts
    respawn_at: float = math.inf


class StageFailure(RuntimeError):
    """A stage died, reported an error, hung, or never started; the message names it."""


class Supervisor:
    def __init__(self, config: Config, graph: Graph | None = None) -> None:
        self.config = config
        self.graph = graph or pipeline_graph(infer_workers=config.infer.workers,
                                             refine=config.infer.refine != "off",
                                             screen=config.infer.screen_bundle is not None,
                                             remote=config.transport.remote)
        self.run_id = uuid.uuid4().hex[:12]
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.out = Path(config.run.out or Path("runs") / f"{stamp}-{self.run_id}")
        self.telemetry = Telemetry(self.graph, config.run.summary_skip)
        self.handles: dict[str, StageHandle] = {}  # by instance
        self.stop_signal: str | None = None
        self.force_stop = False
        self.shutdown_deadline = math.inf
        self.error: str | None = None
        self.summary: dict[str, Any] = {}
        self._view: EventView | None = None
        self.viewer: Viewer | None = None
        self._draining = False
        self._stopping = False  # the run is over: a failure now is reported, not restarted
        self._notes: list[dict[str, Any]] = []  # restart notes waiting to go out as health events

    # -- the run -----------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run to the end of the source, a signal, or a failure. Returns the process exit code: 0 for a run
        that completed or was stopped by a signal, 1 when a stage failed, 2 for a bad configuration."""
        try:
            bundles = self._preflight()
            self._make_run_folder()
            self.viewer = open_viewer(self.config, self.out)
        except ConfigError as exc:
            print(f"sweepstream: error: {exc}", file=sys.stderr)
            return 2
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
            wiring = Wiring.for_run(self.graph, socket_dir, ring=ring.name, out=str(self.out),
                                    run_id=self.run_id, supervisor_pid=os.getpid())
            self.control.bind(wiring.control)
            cleanup.callback(self._take_down)
            try:
                # Blocked while spawning, so children start with them blocked (and ignore them from their
                # first line on), while one that arrives meanwhile waits for this process, not lost.
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                try:
                    self._spawn(wiring, bundles)
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                self._supervise()
            except StageFailure as exc:
                self.error = str(exc)
            self.t_end = self.t_end or time.monotonic()
        self._write_summary()
        if self.viewer is not None:
            self.viewer.finish(self.telemetry, self.config.run.viewer_linger)
        if self.error:
            print(f"sweepstream: {self.error}", file=sys.stderr)
            return 1
        return 0

    def _preflight(self) -> dict[str, Bundle]:
        """Everything that can be checked before a process starts: the bundles (loaded and verified once,
        then handed to every stage: "main", and "screen" in a screening cascade), the engine asked for,
        and a run folder that holds no earlier run."""
        infer = self.config.infer
        bundles: dict[str, Bundle] = {}
        for role, key, path in (("main", "bundle", infer.bundle), ("screen", "screen_bundle",
                                                                    infer.screen_bundle)):
            if path is None:
                continue
            try:
                bundles[role] = load_bundle(path)
            except BundleError as exc:
                raise ConfigError(f"infer.{key}: {exc}") from None
        screen = bundles.get("screen")
        if screen is not None and screen.sha256 == bundles["main"].sha256:
            raise ConfigError(f"infer.screen_bundle: {infer.screen_bundle} is the main bundle's own model; "
                              "a screen must be a faster model (or leave it unset)")
        for bundle in bundles.values():
            try:
                preflight_engine(infer, bundle)
            except EngineError as exc:
                raise ConfigError(f"infer.engine: {exc}") from None
        if (self.out / "events.jsonl").exists():
            raise ConfigError(f"run.out: {self.out} already holds a run (events.jsonl); "
                              "choose another folder")
        return bundles

    def _make_run_folder(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(to_toml(self.config))
        except OSError as exc:
            raise ConfigError(f"run.out: cannot write the run folder {self.out}: "
                              f"{exc.strerror or exc}") from None

    def _spawn(self, wiring: Wiring, bundles: dict[str, Bundle]) -> None:
        self._wiring, self._bundles = wiring, bundles
        for spec in self.graph.stages:
            for instance in spec.instances():
                self.handles[instance] = StageHandle(spec.name, instance, self._start_process(spec.name,
                                                                                             instance, 0))

    def _start_process(self, stage: str, instance: str, life: int) -> multiprocessing.process.BaseProcess:
        process = multiprocessing.get_context("spawn").Process(
            target=run_stage, args=(stage, instance, self.config, self._wiring, self._bundles, life),
            name=f"sweepstream-{instance}", daemon=True)
        process.start()
        return process

    # -- the watchdog --------------------------------------------------------------------------------------
    def _fail(self, handle: StageHandle, why: str) -> None:
        """A stage died, stalled or reported an error: restart it (after a backoff that doubles with each
        restart in the window), unless it used up its restarts or the run is shutting down."""
        cfg = self.config.run
        now = time.monotonic()
        recent = [t for t in handle.restarted_at if now - t < cfg.restart_window_s]
        what = f"stage '{handle.instance}' {why}"
        if self.stop_signal or self._draining or self._stopping or cfg.max_restarts == 0:
            raise StageFailure(what)
        if len(recent) >= cfg.max_restarts:
            raise StageFailure(f"{what}; restarted {len(recent)} times within {cfg.restart_window_s:g} s "
                               "(run.max_restarts), giving up")
        if handle.process.is_alive():
            handle.process.kill()  # also ends a stopped (SIGSTOP) process
        handle.process.join(timeout=5)
        backoff = min(RESTART_BACKOFF_MAX_S, cfg.restart_backoff_s * 2 ** len(recent))
        handle.restarted_at = [*recent, now]
        handle.state, handle.respawn_at = "restarting", now + backoff
        note = self.telemetry.restarted(handle.stage, handle.instance, why, now - self.t_start)
        self._notes.append({"restart": note})
        log.warning("%s: restarting it in %.2f s (restart %d within %g s)", what, backoff, len(recent) + 1,
                    cfg.restart_window_s)

    def _respawn(self, handle: StageHandle, now: float) -> None:
        handle.life += 1
        handle.process = self._start_process(handle.stage, handle.instance, handle.life)
        handle.state, handle.last_seen, handle.respawn_at = "spawned", now, math.inf

    def _rejoin(self, handle: StageHandle) -> None:
        """A restarted stage is ready: the source is told to go on (and to drain, if the run drains), and
        the console follows postprocess's events socket, which may have moved (a `*` port)."""
        if self.t_go is None:
            return
        if handle.stage == self.graph.source.name:
            self._tell(handle.instance, Kind.GO)
            if self._draining:
                self._tell(handle.instance, Kind.DRAIN)
        events = handle.describe.get("events")
        if events and self._view is not None and self._view.endpoint != events:
            self._view.close()
            self._view = EventView(self.context, events)
        if events and self.viewer is not None:
            self.viewer.follow(events, handle.describe.get("preview"), handle.describe.get("control"),
                               self._client_keys())

    def _client_keys(self) -> ClientKeys | None:
        """The console's client keys in a run with Curve keys (the viewer is the console's too)."""
        keys = self.config.transport.curve_keys
        return None if keys is None else console_keys(keys)

    def _instances(self, stage: str) -> list[str]:
        return [h.instance for h in self.handles.values() if h.stage == stage]

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
                self._go(now)
                next_health = now + cfg.health_interval
            self._show_events()
            if self.viewer is not None:
                self.viewer.update(self.telemetry)
            if self.stop_signal and not draining:
                log.info("%s: draining the pipeline", self.stop_signal)
                draining = self._draining = True
                self._tell_stage(self.graph.source.name, Kind.DRAIN)
            if self.force_stop:
                log.warning("second %s: stopping without draining", self.stop_signal)
                break
            if draining and now > self.shutdown_deadline - DRAIN_EXIT_RESERVE_S:
                stuck = [h.instance for h in self.handles.values() if h.state != "done"]
                log.warning("stages did not drain within %.1f s: %s", cfg.stop_timeout, ", ".join(stuck))
                break
            if not cfg.quiet and now >= next_status:
                next_status = now + cfg.status_interval
                self.telemetry.print_status(now, self.t_start, self.t_go or self.t_start)
            if cfg.health_interval and now >= next_health:
                next_health = now + cfg.health_interval
                self._send_health(now)
            self._send_notes()
        self.t_end = time.monotonic()

    def _go(self, now: float) -> None:
        """Every stage is ready: open the console's view of the events, then let the source produce."""
        self.t_go = now
        if not self.config.run.quiet:
            described = (h.describe.get("events") for h in self.handles.values())
            events = next((endpoint for endpoint in described if endpoint), None)
            keys = self.config.transport.curve_keys
            if events:
                self._view = EventView(self.context, events, keys and console_keys(keys))
        post = next((h.describe for h in self.handles.values() if h.describe.get("events")), None)
        if self.viewer is not None and post is not None:
            self.viewer.follow(post["events"], post.get("preview"), post.get("control"), self._client_keys())
        self._tell_stage(self.graph.source.name, Kind.GO)

    def _show_events(self) -> None:
        if self._view is not None:
            for line in self._view.lines():
                self.telemetry.print_line(line)

    def _publisher_ready(self) -> bool:
        receivers = [h for h in self.handles.values() if h.stage == self.graph.counted_out[0]]
        return all(h.state == "ready" for h in receivers)

    def _send_health(self, now: float) -> None:
        """Health figures go to postprocess, which publishes them as a `health` event."""
        if not self._publisher_ready():
            return
        states = {h.instance: h.state for h in self.handles.values()}
        self._tell_stage(self.graph.counted_out[0], Kind.HEALTH,
                         self.telemetry.health(now, self.t_go, states))

    def _send_notes(self) -> None:
        """Restart notes, as health events of their own, once postprocess can publish them."""
        while self._notes and self._publisher_ready():
            self._tell_stage(self.graph.counted_out[0], Kind.HEALTH, self._notes.pop(0))

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
        kind = kind_of(msg)
        if kind is Kind.READY:
            handle.state = "ready"
            handle.describe = msg.header.get("describe", {})
            if handle.life:
                self._rejoin(handle)
        elif kind in (Kind.REPORT, Kind.DONE):
            self.telemetry.report(handle.instance, msg.header.get("counters", {}), msg.arrays,
                                  msg.header.get("status", {}))
            if kind is Kind.DONE:
                handle.state = "done"
        elif kind is Kind.ERROR:
            handle.state = "failed"
            self._fail(handle, f"failed: {msg.header.get('message', 'unknown error')}")
        elif kind is not Kind.HELLO:
            log.warning("control: unexpected %r from %s", msg.kind, handle.instance)

    def _check_health(self, now: float) -> None:
        cfg = self.config.run
        for handle in self.handles.values():
            if handle.state == "restarting":
                if now >= handle.respawn_at:
                    self._respawn(handle, now)
                continue
            code = handle.process.exitcode
            if code is not None and handle.state not in ("done", "failed"):
                if self.control.poll(0):  # its last words may still be in flight
                    self._receive()
                    continue
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                self._fail(handle, how)
                continue
            limit = cfg.start_timeout if handle.state == "spawned" else cfg.stall_timeout
            if handle.state in ("spawned", "ready") and now - handle.last_seen > limit:
                what = "did not start" if handle.state == "spawned" else "stalled (no report)"
                self._fail(handle, f"{what} within {limit:.0f} s")

    def _tell_stage(self, stage: str, kind: Kind, header: dict[str, Any] | None = None) -> None:
        for instance in self._instances(stage):
            self._tell(instance, kind, header)

    def _tell(self, instance: str, kind: Kind, header: dict[str, Any] | None = None) -> None:
        """A command to one stage process. `go` and `drain` must arrive: one that cannot be delivered to a
        live stage fails the run, naming it; to a stage already gone it is moot (its exit is handled)."""
        try:
            delivered = wire.send(self.control, control(kind, header), to=instance.encode())
        except zmq.ZMQError as exc:
            delivered, why = False, str(exc)
        else:
            why = "its queue is full"
        if not delivered and kind in (Kind.GO, Kind.DRAIN) and self.handles[instance].process.is_alive():
            raise StageFailure(f"stage '{instance}' could not be told {kind.value!r}: {why}")

    def _take_down(self) -> None:
        """Every stage ends: asked first, killed at the shutdown deadline. Nothing outlives the supervisor.
        (Stages ignore SIGTERM, so that a signal to the whole process group reaches only the supervisor.)
        A stage that fails while stopping (say, postprocess cannot write the open sweep's final events)
        fails the run: its error is heard after it exits."""
        self._stopping = True
        self._show_events()
        if self._view is not None:
            self._view.close()
            self._view = None
        for handle in self.handles.values():
            if handle.process.is_alive():
                self._tell(handle.instance, Kind.EXIT)
        deadline = min(self.shutdown_deadline, time.monotonic() + self.config.run.stop_timeout)
        deadline = max(deadline, time.monotonic() + DRAIN_EXIT_RESERVE_S)
        for handle in self.handles.values():
            handle.process.join(max(0.0, deadline - time.monotonic()))
        for handle in self.handles.values():
            if handle.process.is_alive():
                log.warning("stage '%s' did not exit in time; killing it", handle.instance)
                handle.process.kill()
                handle.process.join()
        self._hear_last_words()
        self.telemetry.end_status()

    def _hear_last_words(self) -> None:
        if self.error is not None:
            return  # the first failure is the one reported
        try:
            self._receive()
        except StageFailure as exc:
            self.error = str(exc)
            return
        failed = [h.instance for h in self.handles.values() if h.process.exitcode not in (0, -9)]
        if failed:
            self.error = f"stage '{failed[0]}' failed while stopping (exit code " \
                         f"{self.handles[failed[0]].process.exitcode}); see its log above"

    def _write_summary(self) -> None:
        active = (self.t_end - self.t_go) if self.t_go is not None else 0.0
        outcome = "failed" if self.error else ("interrupted" if self.stop_signal else "completed")
        stages = {name: {"counters": self.telemetry.counters.get(name, {}), **h.describe}
                  for name, h in self.handles.items()}
        self.summary = self.telemetry.summary(
            run_id=self.run_id, outcome=outcome, error=self.error, signal=self.stop_signal, active_s=active,
            stages=stages, config=self.config.as_dict())
        write_summary(self.summary, self.out)
        if not self.config.run.quiet:
            print(format_summary(self.summary, self.out), file=sys.stderr)


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
