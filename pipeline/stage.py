"""One stage = one OS process. The runner here gives every stage the same life: start (heavy set-up), a loop
that polls its inputs and the supervisor's control socket, reports from the loop itself (so a report proves
the loop is alive), and stop. Sockets come from the graph (`pipeline.graph`); backpressure is applied in one
place, `take` and `push`."""

from __future__ import annotations

import faulthandler
import importlib
import logging
import os
import shutil
import signal
import time
import traceback
from typing import Any, ClassVar

import numpy as np
import zmq

from engines.bundle import Bundle

from . import wire
from .config import MAX_BATCH, Config
from .graph import ROLES, StageCounters, Wiring
from .messages import HOPS, FrameRef, Kind, control, kind_of
from .security import ClientKeys, ServerSecurity
from .wire import Message

log = logging.getLogger("sweepstream")

REPORT_INTERVAL_S = 0.25
MAX_TAKE = 1024  # messages read in one go at most, so a flooded input cannot starve the control socket
SEND_RETRY_MS = 100  # a waiting send wakes this often to check its deadline
CONTROL_SEND_MS = 1000  # a control message not taken within this is a lost supervisor, not a retry


class SupervisorGone(RuntimeError):
    """The supervisor died without telling us; nothing downstream can be trusted any more."""


class ControlLost(RuntimeError):
    """A message to the supervisor could not be sent: the run cannot be steered any more."""


class Stage:
    """Base of the stages. Subclasses open their graph links in `start` and handle input in `step`."""

    poll_ms: ClassVar[int] = 100  # how long the runner waits for input or control before calling step()
    stamp_in: ClassVar[str] = ""  # header timestamp set when a frame is taken in (metrics.STAMPS)
    stamp_out: ClassVar[str] = ""  # ... and when it is handed on
    client_keys: ClientKeys | None = None  # Curve client keys for what it connects to (a remote worker)
    # Reconnect interval and its backoff ceiling (ms; 0: none): a local peer that binds late is found
    # quickly; a remote worker backs off instead of knocking at a run that refuses it 100 times a second.
    reconnect_ms: ClassVar[tuple[int, int]] = (10, 0)

    def __init__(self, name: str, instance: str, config: Config, wiring: Wiring,
                 bundles: dict[str, Bundle], context: zmq.Context, life: int = 0) -> None:
        self.name = name  # the stage in the graph
        self.instance = instance  # this process: the name, or name-i for a replicated stage
        self.config = config
        self.wiring = wiring
        self.bundles = bundles  # "main", and "screen" in a screening cascade
        self.bundle = bundles[wiring.graph.stage(name).bundle]  # the one this stage's own model runs
        self.life = life  # 0 for the first process; a restarted stage picks up where the last one left
        self.context = context
        self.counters = StageCounters(name, wiring.graph.counters_of(name))
        self.finished = False
        self.inputs: list[zmq.Socket] = []
        self.outputs: list[zmq.Socket] = []
        self._sockets: list[zmq.Socket] = []
        self._carries: dict[zmq.Socket, Kind] = {}
        self._senders: dict[zmq.Socket, int] = {}  # input socket -> sender processes whose end it awaits
        self._lossless = config.transport.policy == "lossless"
        self._security: ServerSecurity | None = None

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

    def status(self) -> dict[str, Any]:
        """What the stage's counters cannot say, for health events (preprocess: its remote workers)."""
        return {}

    @property
    def security(self) -> ServerSecurity:
        """This process's server side of CurveZMQ (started on first use: a ZAP thread when the run has
        keys, nothing otherwise)."""
        if self._security is None:
            self._security = ServerSecurity(self.context, self.config.transport.curve_keys)
        return self._security

    # -- sockets and backpressure ----------------------------------------------------------------------
    def open(self, link_name: str, *, hwm: int | None = None) -> zmq.Socket:
        """This stage's end of a graph link, with the kind, binding and high-water mark the graph declares
        (`hwm` raises the mark further, e.g. to one engine batch)."""
        link = self.wiring.graph.link(link_name)
        side = link.side(self.name)
        kind = {("push", "sender"): zmq.PUSH, ("push", "receiver"): zmq.PULL,
                ("work", "sender"): zmq.ROUTER, ("work", "receiver"): zmq.DEALER}[link.pattern, side]
        sock = self.context.socket(kind)
        marks = [self.config.transport.hwm, hwm or 0]
        if link.hwm == "batch":
            batch = self.config.infer.max_batch
            marks.append((MAX_BATCH if batch == "auto" else batch) + 1)
        sock.setsockopt(zmq.SNDHWM, max(marks))
        sock.setsockopt(zmq.RCVHWM, max(marks))
        sock.setsockopt(zmq.SNDTIMEO, SEND_RETRY_MS)
        sock.setsockopt(zmq.LINGER, int(self.config.run.stop_timeout * 1000))
        sock.setsockopt(zmq.RECONNECT_IVL, self.reconnect_ms[0])
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, self.reconnect_ms[1])
        if kind == zmq.DEALER:
            sock.setsockopt(zmq.ROUTING_ID, f"{self.instance}-{os.getpid()}".encode())
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # else a ROUTER silently drops what a peer cannot take
        if side != link.bound_by and self.client_keys is not None:
            self.client_keys.apply(sock)
        if kind == zmq.PUSH and side != link.bound_by:
            # Otherwise frames queue on a connection not yet made, and overflow before it is.
            sock.setsockopt(zmq.IMMEDIATE, 1)
        endpoint = self.wiring.endpoints[link.name]
        sock.bind(endpoint) if side == link.bound_by else sock.connect(endpoint)
        if link.remote is not None and side == link.bound_by:
            self.security.secure(sock)  # the remote endpoint only: the local one was bound before
            try:
                sock.bind(link.remote)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise RuntimeError(f"transport.remote {link.remote}: cannot bind: {exc}") from None
        self._sockets.append(sock)
        if side == "receiver" or kind == zmq.ROUTER:
            self.inputs.append(sock)
        if kind == zmq.PUSH:
            self.outputs.append(sock)
        if side == "receiver":
            self._carries[sock] = link.carries
            self._senders[sock] = self.wiring.graph.stage(link.sender).replicas
        return sock

    def take(self, sock: zmq.Socket, keep: int) -> tuple[list[Any], bool]:
        """The hops waiting on `sock` (decoded to the type its link carries): at most `keep` of them, and
        whether the end of stream came (from every sender process of the link: each infer worker ends its
        own stream, and results of the others may still be on their way).

        latest policy: everything waiting is read and only the newest `keep` are kept; the older ones are
        counted as `drop_stale`. lossless policy: at most `keep` are read; the rest wait in the queue.
        """
        carries = self._carries[sock]
        hops: list[Any] = []
        end = False
        limit = keep if self._lossless else MAX_TAKE
        while len(hops) < limit and not end:
            try:
                msg = wire.recv(sock)
                if msg is None:
                    break
                if kind_of(msg) is Kind.EOS:
                    self._senders[sock] -= 1
                    end = self._senders[sock] <= 0
                    continue
                if msg.kind != carries.value:
                    raise wire.WireError(f"a {msg.kind!r} message where {carries.value!r} travels")
                hop = HOPS[carries](msg)
            except wire.WireError as exc:
                self.reject(f"a malformed message: {exc}")
                continue
            if self.acceptable(hop):
                frame_of(hop).stamps[self.stamp_in] = time.monotonic_ns()
                hops.append(hop)
        self.counters["received"] += len(hops)
        stale = max(0, len(hops) - keep)
        self.counters["drop_stale"] += stale
        return hops[stale:], end

    def acceptable(self, hop: Any) -> bool:
        """A well-formed hop may still not fit this stage (wrong outputs for its bundle); then it is a
        counted rejection (see `reject`)."""
        return True

    def reject(self, why: str) -> None:
        self.counters["rejected"] += 1
        if self.counters["rejected"] <= 10 or self.counters["rejected"] % 1000 == 0:
            log.warning("%s: rejected %s (%d so far)", self.name, why, self.counters["rejected"])

    def push(self, sock: zmq.Socket, hop: Any, *, wait: bool = False, to: bytes | None = None,
             stamp: bool = True, sent: str = "sent") -> bool:
        """Send one hop downstream: never blocks under the latest policy (a full queue is a counted drop);
        under lossless, or when the caller asks to `wait`, it waits up to the stall timeout. `sent`: the
        counter of what went (a relay counts what it passes on apart from what it sends itself)."""
        if stamp:
            frame_of(hop).stamps[self.stamp_out] = time.monotonic_ns()
        msg = hop.message()
        if self._lossless or wait:
            deadline = time.monotonic() + self.config.run.stall_timeout
            while time.monotonic() < deadline:
                if wire.send(sock, msg, block=True, to=to):
                    self.counters[sent] += 1
                    return True
                _check_supervisor(self.wiring)
        elif wire.send(sock, msg, to=to):
            self.counters[sent] += 1
            return True
        self.counters["drop_send_full"] += 1
        return False

    def send_eos(self, sock: zmq.Socket, to: bytes | None = None) -> None:
        """The end of stream must not be dropped: it is what lets the next stage finish cleanly."""
        deadline = time.monotonic() + self.config.run.stop_timeout
        while not wire.send(sock, control(Kind.EOS), block=True, to=to):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: could not pass the end of stream on within "
                                   f"{self.config.run.stop_timeout:g} s")

    def close_sockets(self) -> None:
        if self._security is not None:  # its monitors and ZAP thread first: they watch these sockets
            self._security.close()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


def frame_of(hop: Any) -> FrameRef:
    """The frame a hop is about (a FrameRef is its own)."""
    return hop if isinstance(hop, FrameRef) else hop.frame


def set_process_title(name: str) -> None:
    """`sweepstream: NAME` in ps and top (and for the benchmark's process sampler), where setproctitle is
    installed."""
    try:
        import setproctitle

        setproctitle.setproctitle(f"sweepstream: {name}")
    except ImportError:
        pass


def _configure_child(name: str) -> None:
    set_process_title(name)
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` dumps a stuck stage's stack
    # Ctrl-C and a SIGTERM to the process group reach every stage; only the supervisor acts on them, then
    # drains and stops the stages in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))  # blocked by the spawner
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name:>11} %(levelname)s %(message)s")


def stage_class(role: str) -> type[Stage]:
    """The class of a graph role, imported in the child only (a capture process never loads an engine)."""
    module, _, name = ROLES[role].partition(":")
    return getattr(importlib.import_module(module), name)


def run_stage(name: str, instance: str, config: Config, wiring: Wiring, bundles: dict[str, Bundle],
              life: int = 0) -> None:
    """Process entry point (spawned by the supervisor)."""
    _configure_child(instance)
    context = zmq.Context()
    control_socket = context.socket(zmq.DEALER)
    control_socket.setsockopt(zmq.ROUTING_ID, instance.encode())
    control_socket.setsockopt(zmq.LINGER, int(config.run.stop_timeout * 1000))
    control_socket.setsockopt(zmq.SNDTIMEO, CONTROL_SEND_MS)  # a DEALER whose peer died would block forever
    control_socket.connect(wiring.control)
    stage = stage_class(wiring.graph.stage(name).role)(name, instance, config, wiring, bundles, context,
                                                                 life)
    code = 0
    try:
        _check_supervisor(wiring)
        _tell(control_socket, control(Kind.HELLO, {"pid": os.getpid()}))
        stage.start()
        if _wait_for_peers(stage, control_socket):
            _tell(control_socket, control(Kind.READY, {"describe": stage.describe()}))
            _loop(stage, control_socket)
    except SupervisorGone:
        shutil.rmtree(wiring.socket_dir, ignore_errors=True)  # nobody else is left to remove it
        code = 1
    except Exception as exc:  # the stage's last word: reported to the supervisor, which stops the run
        code = 1
        _last_word(instance, control_socket, exc)
    finally:
        try:
            stage.stop()
        except Exception as exc:  # a failed stop loses work (postprocess: the open sweep's final events)
            if not code:
                code = 1
                _last_word(instance, control_socket, exc)
        stage.close_sockets()
        control_socket.close()
        context.term()
    if code:
        raise SystemExit(code)


def _last_word(instance: str, control_socket: zmq.Socket, exc: Exception) -> None:
    log.error("%s failed:\n%s", instance, traceback.format_exc())
    message = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if not wire.send(control_socket, control(Kind.ERROR, {"message": message}), block=True):
        log.error("%s: could not tell the supervisor that it failed", instance)


def _tell(control_socket: zmq.Socket, msg: Message) -> None:
    if not wire.send(control_socket, msg, block=True):
        raise ControlLost(f"the supervisor did not take a {msg.kind!r} message within {CONTROL_SEND_MS} ms")


def _check_supervisor(wiring: Wiring) -> None:
    """A stage outlives no supervisor (a remote worker, supervisor_pid 0, has none)."""
    if wiring.supervisor_pid and os.getppid() != wiring.supervisor_pid:
        raise SupervisorGone


def _exit_requested(control_socket: zmq.Socket) -> bool:
    """Handle control messages that may arrive before the loop runs; True when told to exit."""
    while (command := wire.recv(control_socket)) is not None:
        if kind_of(command) is Kind.EXIT:
            return True
    return False


def _wait_for_peers(stage: Stage, control_socket: zmq.Socket) -> bool:
    """Wait until every output is connected to its next stage (a PUSH with no connection is not writable,
    and frames sent before would be dropped), answering exit meanwhile. False when told to exit first."""
    poller = zmq.Poller()
    for sock in stage.outputs:
        poller.register(sock, zmq.POLLOUT)
    deadline = time.monotonic() + stage.config.run.start_timeout
    while len(dict(poller.poll(50))) < len(stage.outputs):
        _check_supervisor(stage.wiring)
        if _exit_requested(control_socket):
            return False
        if time.monotonic() > deadline:
            raise RuntimeError(f"next stage did not connect within {stage.config.run.start_timeout:.0f} s")
    return True


def _loop(stage: Stage, control_socket: zmq.Socket) -> None:
    """Runs until the supervisor says exit. A finished stage reports `done` and keeps its sockets open:
    closing them early could discard frames still on their way to the next stage."""
    poller = zmq.Poller()
    poller.register(control_socket, zmq.POLLIN)
    for sock in stage.inputs:
        poller.register(sock, zmq.POLLIN)
    last_report = 0.0
    done_sent = False
    while True:
        events = dict(poller.poll(stage.poll_ms if not stage.finished else 100))
        if control_socket in events and (command := wire.recv(control_socket)) is not None:
            kind = kind_of(command)
            if kind is Kind.EXIT:
                return
            if kind is Kind.GO:
                stage.go()
            elif kind is Kind.DRAIN:
                stage.drain()
            else:
                stage.on_control(command)
        if not stage.finished:
            stage.step(any(sock in events for sock in stage.inputs))
        now = time.monotonic()
        if stage.finished and not done_sent:
            done_sent = True
            _report(stage, control_socket, Kind.DONE)
        elif now - last_report >= REPORT_INTERVAL_S:
            last_report = now
            _check_supervisor(stage.wiring)
            _report(stage, control_socket, Kind.REPORT)


def _report(stage: Stage, control_socket: zmq.Socket, kind: Kind) -> None:
    status = stage.status()  # first: it may refresh a counter (peers refused)
    _tell(control_socket, control(kind, {"counters": dict(stage.counters), "status": status},
                                  stage.report_arrays()))
