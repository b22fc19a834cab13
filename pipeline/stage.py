"""One stage = one OS process. The runner here gives every stage the same life: start (heavy set-up), a loop
that polls its inputs and the supervisor's control socket, reports from the loop itself (so a report proves
the loop is alive), and stop. Backpressure is declared once, in `take` and `push`."""

from __future__ import annotations

import faulthandler
import logging
import os
import shutil
import signal
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import zmq

from engines.bundle import Bundle

from . import wire
from .config import Config
from .wire import Message

log = logging.getLogger("sweepstream")

REPORT_INTERVAL_S = 0.25
MAX_TAKE = 1024  # messages read in one go at most, so a flooded input cannot starve the control socket
SEND_RETRY_MS = 100  # a waiting send wakes this often to check its deadline


@dataclass(frozen=True)
class Endpoints:
    """Where everything of one run lives; built by the supervisor, handed to every stage."""

    control: str  # supervisor ROUTER; each stage is a DEALER named after itself
    frames: str  # capture -> preprocess (headers; pixels are in the ring)
    inputs: str  # preprocess ROUTER <- infer DEALERs asking for work (model input tensors)
    results: str  # infer -> postprocess (head outputs)
    ring: str  # shared-memory name of the frame ring
    out: str  # run folder
    run_id: str
    supervisor_pid: int
    socket_dir: str


class SupervisorGone(RuntimeError):
    """The supervisor died without telling us; nothing downstream can be trusted any more."""


class Stage:
    """Base of the four stages. Subclasses declare `name`, open sockets in `start`, handle input in `step`."""

    name: ClassVar[str]
    poll_ms: ClassVar[int] = 100  # how long the runner waits for input or control before calling step()
    stamp_in: ClassVar[str] = ""  # header timestamp set when a frame is taken in (metrics.STAMPS)
    stamp_out: ClassVar[str] = ""  # ... and when it is handed on
    needs: ClassVar[tuple[str, ...]] = ()  # header fields a frame must carry to be taken in

    def __init__(self, config: Config, endpoints: Endpoints, bundle: Bundle, context: zmq.Context) -> None:
        self.config = config
        self.endpoints = endpoints
        self.bundle = bundle
        self.context = context
        self.counters: Counter[str] = Counter()
        self.finished = False
        self.inputs: list[zmq.Socket] = []
        self.outputs: list[zmq.Socket] = []
        self._sockets: list[zmq.Socket] = []
        self._lossless = config.transport.policy == "lossless"

    # -- life cycle, overridden by stages --------------------------------------------------------------
    def start(self) -> None:
        """Open sockets and resources; may take long (engine load). Called once before the loop."""

    def go(self) -> None:
        """The whole pipeline is ready: sources may begin producing."""

    def step(self, ready: bool) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        """Shutdown asked: stop taking new work, pass the end of stream on."""

    def on_control(self, msg: Message) -> None:
        """Any other message from the supervisor (postprocess: the pipeline's health, to publish)."""
        log.debug("%s: ignored control message %r", self.name, msg.kind)

    def stop(self) -> None:
        """Release everything opened in start; must tolerate a start that failed half-way."""

    def describe(self) -> dict[str, Any]:
        return {}

    def report_arrays(self) -> tuple[np.ndarray, ...]:
        """Per-frame data for the supervisor since the last report (postprocess: latency rows)."""
        return ()

    # -- sockets and backpressure ----------------------------------------------------------------------
    def socket(self, kind: int, endpoint: str, *, bind: bool, hwm: int | None = None) -> zmq.Socket:
        """A data socket with the run's backpressure settings (`hwm` overrides the configured mark)."""
        sock = self.context.socket(kind)
        hwm = hwm or self.config.transport.hwm
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.SNDTIMEO, SEND_RETRY_MS)
        sock.setsockopt(zmq.LINGER, int(self.config.run.stop_timeout * 1000))
        sock.setsockopt(zmq.RECONNECT_IVL, 10)  # a peer that binds late is found quickly (local sockets)
        if kind == zmq.DEALER:
            sock.setsockopt(zmq.ROUTING_ID, f"{self.name}-{os.getpid()}".encode())
        if kind == zmq.PUSH and not bind:
            # Otherwise frames queue on a connection not yet made, and overflow before it is.
            sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.bind(endpoint) if bind else sock.connect(endpoint)
        self._sockets.append(sock)
        if kind in (zmq.PULL, zmq.ROUTER, zmq.DEALER):
            self.inputs.append(sock)
        if kind == zmq.PUSH:
            self.outputs.append(sock)
        return sock

    def take(self, sock: zmq.Socket, keep: int) -> tuple[list[Message], bool]:
        """What is waiting on `sock`: at most `keep` frames, and whether the end of stream came.

        latest policy: everything waiting is read and only the newest `keep` frames are kept; the older ones
        are counted as `drop_stale`. lossless policy: at most `keep` are read; the rest wait in the queue.
        """
        frames: list[Message] = []
        end = False
        limit = keep if self._lossless else MAX_TAKE
        while len(frames) < limit and not end:
            try:
                msg = wire.recv(sock)
            except wire.WireError as exc:
                self.reject(f"a malformed message: {exc}")
                continue
            if msg is None:
                break
            if msg.kind == "eos":
                end = True
            elif self.acceptable(msg):
                msg.header["t"][self.stamp_in] = time.monotonic_ns()
                frames.append(msg)
        self.counters["received"] += len(frames)
        stale = max(0, len(frames) - keep)
        self.counters["drop_stale"] += stale
        return frames[stale:], end

    def acceptable(self, msg: Message) -> bool:
        """A decodable message can still lack what this stage needs; it is then a counted rejection."""
        header = msg.header
        missing = [key for key in ("id", "t", *self.needs) if key not in header]
        if missing or not isinstance(header["t"], dict) or type(header["id"]) is not int:
            self.reject(f"a {msg.kind!r} message without a valid {', '.join(missing) or 'id or t'}")
            return False
        return True

    def reject(self, why: str) -> None:
        self.counters["rejected"] += 1
        if self.counters["rejected"] <= 10 or self.counters["rejected"] % 1000 == 0:
            log.warning("%s: rejected %s (%d so far)", self.name, why, self.counters["rejected"])

    def push(self, sock: zmq.Socket, msg: Message, *, wait: bool = False, to: bytes | None = None,
             stamp: bool = True) -> bool:
        """Send one frame downstream: never blocks under the latest policy (a full queue is a counted drop);
        under lossless, or when the caller asks to `wait`, it waits up to the stall timeout."""
        if stamp:
            msg.header["t"][self.stamp_out] = time.monotonic_ns()
        if self._lossless or wait:
            deadline = time.monotonic() + self.config.run.stall_timeout
            while time.monotonic() < deadline:
                if wire.send(sock, msg, block=True, to=to):
                    self.counters["sent"] += 1
                    return True
                _check_supervisor(self.endpoints)
        elif wire.send(sock, msg, to=to):
            self.counters["sent"] += 1
            return True
        self.counters["drop_send_full"] += 1
        return False

    def send_eos(self, sock: zmq.Socket, to: bytes | None = None) -> None:
        """The end of stream must not be dropped: it is what lets the next stage finish cleanly."""
        deadline = time.monotonic() + self.config.run.stop_timeout
        while not wire.send(sock, Message("eos", {}), block=True, to=to):
            if time.monotonic() > deadline:
                log.warning("%s: could not pass the end of stream on", self.name)
                break

    def close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


def _configure_child(name: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(f"sweepstream: {name}")
    except ImportError:
        pass
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` dumps a stuck stage's stack
    # Ctrl-C and a SIGTERM to the process group reach every stage; only the supervisor acts on them, then
    # drains and stops the stages in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))  # blocked by the spawner
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name:>11} %(levelname)s %(message)s")


def run_stage(stage_cls: type[Stage], config: Config, endpoints: Endpoints, bundle: Bundle) -> None:
    """Process entry point (spawned by the supervisor)."""
    _configure_child(stage_cls.name)
    context = zmq.Context()
    control = context.socket(zmq.DEALER)
    control.setsockopt(zmq.ROUTING_ID, stage_cls.name.encode())
    control.setsockopt(zmq.LINGER, int(config.run.stop_timeout * 1000))
    control.setsockopt(zmq.SNDTIMEO, 1000)  # a DEALER whose peer died would otherwise block forever
    control.connect(endpoints.control)
    stage = stage_cls(config, endpoints, bundle, context)
    code = 0
    try:
        _check_supervisor(endpoints)
        wire.send(control, Message("hello", {"pid": os.getpid()}), block=True)
        stage.start()
        if _wait_for_peers(stage, control):
            wire.send(control, Message("ready", {"describe": stage.describe()}), block=True)
            _loop(stage, control)
    except SupervisorGone:
        shutil.rmtree(endpoints.socket_dir, ignore_errors=True)  # nobody else is left to remove it
        code = 1
    except Exception as exc:  # the stage's last word: reported to the supervisor, which stops the run
        code = 1
        log.error("%s failed:\n%s", stage.name, traceback.format_exc())
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        wire.send(control, Message("error", {"message": message}), block=True)
    finally:
        stage.stop()
        stage.close_sockets()
        control.close()
        context.term()
    if code:
        raise SystemExit(code)


def _check_supervisor(endpoints: Endpoints) -> None:
    if os.getppid() != endpoints.supervisor_pid:
        raise SupervisorGone


def _exit_requested(control: zmq.Socket) -> bool:
    """Handle control messages that may arrive before the loop runs; True when told to exit."""
    while (command := wire.recv(control)) is not None:
        if command.kind == "exit":
            return True
    return False


def _wait_for_peers(stage: Stage, control: zmq.Socket) -> bool:
    """Wait until every output is connected to its next stage (a PUSH with no connection is not writable,
    and frames sent before would be dropped), answering exit meanwhile. False when told to exit first."""
    poller = zmq.Poller()
    for sock in stage.outputs:
        poller.register(sock, zmq.POLLOUT)
    deadline = time.monotonic() + stage.config.run.start_timeout
    while len(dict(poller.poll(50))) < len(stage.outputs):
        _check_supervisor(stage.endpoints)
        if _exit_requested(control):
            return False
        if time.monotonic() > deadline:
            raise RuntimeError(f"next stage did not connect within {stage.config.run.start_timeout:.0f} s")
    return True


def _loop(stage: Stage, control: zmq.Socket) -> None:
    """Runs until the supervisor says exit. A finished stage reports `done` and keeps its sockets open:
    closing them early could discard frames still on their way to the next stage."""
    poller = zmq.Poller()
    poller.register(control, zmq.POLLIN)
    for sock in stage.inputs:
        poller.register(sock, zmq.POLLIN)
    last_report = 0.0
    done_sent = False
    while True:
        events = dict(poller.poll(stage.poll_ms if not stage.finished else 100))
        if control in events:
            command = wire.recv(control)
            kind = command.kind if command is not None else None
            if kind == "exit":
                return
            if kind == "go":
                stage.go()
            elif kind == "drain":
                stage.drain()
            elif command is not None:
                stage.on_control(command)
        if not stage.finished:
            stage.step(any(sock in events for sock in stage.inputs))
        now = time.monotonic()
        if stage.finished and not done_sent:
            done_sent = True
            _report(stage, control, "done")
        elif now - last_report >= REPORT_INTERVAL_S:
            last_report = now
            _check_supervisor(stage.endpoints)
            _report(stage, control, "report")


def _report(stage: Stage, control: zmq.Socket, kind: str) -> None:
    wire.send(control, Message(kind, {"counters": dict(stage.counters)}, stage.report_arrays()), block=True)
