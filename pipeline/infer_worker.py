"""A remote infer worker: serves a run's work queue from another machine (or another process here).

The run exposes its main model's work on `transport.remote = "tcp://ADDR:PORT"`; each worker connects
there, asks for up to a batch whenever it is idle (the same pull protocol as the local infer stage, whose
class it runs), and returns its results over that one connection. Any number of workers may connect; a
worker that vanishes costs the run only the batch it held, and one that connects again is used again.
While idle it repeats its ask every second, which is its heartbeat. With `--curve-keys DIR` (a client
folder made by tools/keys.py) it is a CurveZMQ client, as a run with `transport.curve_keys` requires.
Exits 0 at the end of the run it serves (or on Ctrl-C), 2 on bad arguments.
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
    parser.add_argument("--connect", required=True, metavar="URL",
                        help="the run's transport.remote endpoint, tcp://HOST:PORT")
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


def build_stage(args: argparse.Namespace, context: zmq.Context) -> RemoteInferStage:
    """The worker's stage, or a ConfigError / KeyFolderError / BundleError naming what is wrong."""
    if not args.connect.startswith("tcp://") or not args.connect.rsplit(":", 1)[-1].isdigit():
        raise ConfigError(f"--connect: {args.connect!r} is not tcp://HOST:PORT")
    config = load_config(overrides={"infer.bundle": args.bundle, "infer.engine": args.engine,
                                    "infer.max_batch": args.max_batch, "infer.threads": args.threads})
    bundle = load_bundle(args.bundle)
    graph = pipeline_graph(remote=args.connect)
    wiring = Wiring(graph, control="", endpoints={"inputs": args.connect})
    stage = RemoteInferStage("infer", args.name, config, wiring, {"main": bundle}, context)
    stage.client_keys = None if args.curve_keys is None else ClientKeys.load(args.curve_keys)
    return stage


def serve(stage: RemoteInferStage, url: str) -> int:
    """Start the engine, then serve until the run ends (or Ctrl-C); returns the frames scored."""
    stopping = []
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    stage.start()
    log.info("worker %s: %s; serving %s (Curve %s)", stage.instance, stage.reason, url,
             "on" if stage.client_keys else "off")
    last_ask = last_progress = time.monotonic()
    scored = 0
    while not stage.finished and not stopping:
        stage.step(bool(stage.work.poll(stage.poll_ms)))
        now = time.monotonic()
        if stage.counters["sent"] != scored:
            scored, last_ask = stage.counters["sent"], now
        if stage.waiting and now - last_ask >= HEARTBEAT_S:
            wire.send(stage.work, stage.want())  # the same ask again: a heartbeat, never a second batch
            last_ask = now
        if now - last_progress >= PROGRESS_S:
            last_progress = now
            log.info("worker %s: %d frames scored%s", stage.instance, scored,
                     "" if scored else " (no work yet: is the run up, this worker's key listed and its "
                     "bundle the run's?)")
    if stopping and not stage.finished:  # the run counts what this worker held as lost, at once
        wire.send(stage.out, control(Kind.EOS))  # (not waited for: the run may be gone already)
    return scored


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-infer-worker` command."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s      worker %(levelname)s %(message)s")
    context = zmq.Context()
    try:
        stage = build_stage(args, context)
    except (ConfigError, KeyFolderError, BundleError) as exc:
        print(f"infer_worker: error: {exc}", file=sys.stderr)
        context.term()
        return 2
    try:
        scored = serve(stage, args.connect)
    except EngineError as exc:
        print(f"infer_worker: error: {exc}", file=sys.stderr)
        return 2
    else:
        log.info("worker %s: done, %d frames scored, %d messages rejected", stage.instance, scored,
                 stage.counters["rejected"])
    finally:
        stage.stop()
        stage.close_sockets()
        context.term()
    return 0
