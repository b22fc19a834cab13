"""A remote infer worker: serves a run's work queue from another machine (or another process here).

The run exposes its main model's work on `transport.remote = "tcp://ADDR:PORT"`; each worker connects
there, asks for up to a batch whenever it is idle (the same pull protocol as the local infer stage, whose
class it runs), and returns its results over that one connection. Any number of workers may connect; a
worker that vanishes costs the run only the batch it held, and one that connects again is used again.
While idle it repeats its ask every second, which is its heartbeat. With `--curve-keys DIR` (a client
folder made by tools/keys.py) it is a CurveZMQ client, as a run with `transport.curve_keys` requires.

`--connect` repeated serves several runs (carts, or the probes of one cart) from one engine: each run
gets its own connection and standing ask, and the worker takes one batch from each run that has work in
turn, so no run waits behind another's backlog. Exits 0 once every run it serves has ended (or on
Ctrl-C), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import time

import zmq

from engines.base import EngineError
from engines.bundle import BundleError, load_bundle

from . import wire
from .config import ENGINE_CHOICES, ConfigError, load_config
from .graph import Wiring, pipeline_graph
from .infer import InferStage
from .messages import Kind, control
from .security import ClientKeys, KeyFolderError
from .stage import set_process_title

log = logging.getLogger("sweepstream")

HEARTBEAT_S = 1.0  # an idle worker repeats its ask this often
PROGRESS_S = 10.0  # a progress line this often


class RemoteInferStage(InferStage):
    """The infer stage with one connection for work and results (the run's preprocess relays them)."""

    relays = True
    reconnect_ms = (100, 2000)

    def open_links(self) -> tuple[zmq.Socket, zmq.Socket]:
        (work,) = self.wiring.graph.links_into(self.name, Kind.INPUT)
        sock = self.open(work.name)
        return sock, sock


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connect", required=True, action="append", metavar="URL",
                        help="the run's transport.remote endpoint, tcp://HOST:PORT (repeat to serve several "
                        "runs from one engine)")
    parser.add_argument("--bundle", required=True, metavar="DIR", help="the run's model bundle (same hash)")
    parser.add_argument("--curve-keys", metavar="DIR",
                        help="client key folder (DIR/client-NAME from tools/keys.py); needed when the run "
                        "has transport.curve_keys")
    parser.add_argument("--engine", choices=ENGINE_CHOICES, default="auto", help="inference backend")
    parser.add_argument("--max-batch", default="auto", help="largest batch asked for (auto: by device)")
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0: cores less one)")
    parser.add_argument("--name", default=socket.gethostname(),
                        help="this worker's name in the run's health events (default: the host name)")
    return parser.parse_args(argv)


def build_stages(args: argparse.Namespace, context: zmq.Context) -> list[RemoteInferStage]:
    """One stage per run served, or a ConfigError / KeyFolderError / BundleError naming what is wrong."""
    for url in args.connect:
        if not url.startswith("tcp://") or not url.rsplit(":", 1)[-1].isdigit():
            raise ConfigError(f"--connect: {url!r} is not tcp://HOST:PORT")
    if len(set(args.connect)) != len(args.connect):
        raise ConfigError(f"--connect: a run is named twice ({', '.join(args.connect)})")
    config = load_config(overrides={"infer.bundle": args.bundle, "infer.engine": args.engine,
                                    "infer.max_batch": args.max_batch, "infer.threads": args.threads})
    bundle = load_bundle(args.bundle)
    keys = None if args.curve_keys is None else ClientKeys.load(args.curve_keys)
    stages = []
    for url in args.connect:
        wiring = Wiring(pipeline_graph(remote=url), control="", endpoints={"inputs": url})
        stage = RemoteInferStage("infer", args.name, config, wiring, {"main": bundle}, context)
        stage.client_keys = keys
        stages.append(stage)
    return stages


def serve(stages: list[RemoteInferStage]) -> int:
    """Start the engine, then serve until every run has ended (or Ctrl-C); returns the frames scored."""
    stopping = []
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    first, *others = stages
    first.start()
    for stage in others:  # one engine for all the runs
        stage.engine, stage.reason = first.engine, first.reason
        stage.start()
    names = ", ".join(stage.wiring.endpoints["inputs"] for stage in stages)
    log.info("worker %s: %s; serving %s (Curve %s)", first.instance, first.reason, names,
             "on" if first.client_keys else "off")
    poller = zmq.Poller()
    for stage in stages:
        poller.register(stage.work, zmq.POLLIN)
    last_ask = {id(stage): time.monotonic() for stage in stages}
    sent = {id(stage): 0 for stage in stages}
    last_progress = time.monotonic()
    live = list(stages)
    while live and not stopping:
        ready = dict(poller.poll(min(stage.poll_ms for stage in live)))
        now = time.monotonic()
        for stage in list(live):  # each run with work gets one batch per turn
            stage.step(stage.work in ready)
            if stage.counters["sent"] != sent[id(stage)]:
                sent[id(stage)], last_ask[id(stage)] = stage.counters["sent"], now
            if stage.waiting and now - last_ask[id(stage)] >= HEARTBEAT_S:
                wire.send(stage.work, stage.want())  # the same ask again: a heartbeat, never a second batch
                last_ask[id(stage)] = now
            if stage.finished:
                poller.unregister(stage.work)
                live.remove(stage)
        if now - last_progress >= PROGRESS_S:
            last_progress = now
            scored = sum(sent.values())
            log.info("worker %s: %d frames scored%s", first.instance, scored,
                     "" if scored else " (no work yet: is the run up, this worker's key listed and its "
                     "bundle the run's?)")
    for stage in live:  # stopped early: each run counts what this worker held as lost, at once
        wire.send(stage.out, control(Kind.EOS))  # (not waited for: the run may be gone already)
    return sum(sent.values())


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-infer-worker` command."""
    args = parse_args(argv)
    set_process_title("infer-worker")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s      worker %(levelname)s %(message)s")
    context = zmq.Context()
    try:
        stages = build_stages(args, context)
    except (ConfigError, KeyFolderError, BundleError) as exc:
        print(f"infer_worker: error: {exc}", file=sys.stderr)
        context.term()
        return 2
    try:
        scored = serve(stages)
    except EngineError as exc:
        print(f"infer_worker: error: {exc}", file=sys.stderr)
        return 2
    else:
        log.info("worker %s: done, %d frames scored, %d messages rejected", args.name, scored,
                 sum(stage.counters["rejected"] for stage in stages))
    finally:
        stages[0].stop()  # the one engine
        for stage in stages:
            stage.close_sockets()
        context.term()
    return 0
