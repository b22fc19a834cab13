"""Subscribe to a running sweepstream pipeline and print its events as they happen.

Events are JSON objects published with the event type as the ZeroMQ topic (see the README's event
schema). By default each event is one readable line; --json prints the raw JSON lines instead.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import zmq

from pipeline.events import EVENT_TYPES
from pipeline.security import ClientKeys, KeyFolderError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5556",
                        help="the pipeline's postprocess.events endpoint (default %(default)s)")
    parser.add_argument("--type", action="append", choices=EVENT_TYPES, dest="types",
                        help="only these event types (repeatable; default: all)")
    parser.add_argument("--curve-keys", metavar="DIR",
                        help="client key folder (DIR/client-NAME from tools/keys.py) for a run with "
                        "transport.curve_keys")
    parser.add_argument("--json", action="store_true", help="print raw JSON lines")
    parser.add_argument("--count", type=int, help="exit after this many events")
    parser.add_argument("--timeout", type=float, help="exit after this many seconds without an event")
    return parser.parse_args(argv)


def readable(event: dict) -> str:
    """One line per event: its type, where it is in the run, and the fields that matter for that type."""
    skip = {"schema", "type", "run_id", "sweep_id", "frame_id", "t_capture", "latency_ms", "source"}
    where = f"sweep {event.get('sweep_id')} frame {event.get('frame_id')}"
    latency = f"{event['latency_ms']:.1f} ms" if event.get("latency_ms") is not None else ""
    rest = " ".join(f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in event.items()
                    if key not in skip)
    return f"{event.get('type', '?'):<13} {where:<24} {latency:>9}  {rest}"


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-listen` command: 0 after --count events or Ctrl-C, 1 after --timeout without one,
    2 on a bad endpoint."""
    args = parse_args(argv)
    try:
        keys = None if args.curve_keys is None else ClientKeys.load(args.curve_keys)
    except KeyFolderError as exc:
        print(f"listen: --curve-keys: {exc}", file=sys.stderr)
        return 2
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(socket)
    for kind in args.types or [""]:
        socket.setsockopt(zmq.SUBSCRIBE, kind.encode())
    try:
        socket.connect(args.endpoint)
    except zmq.ZMQError as exc:
        print(f"listen: --endpoint {args.endpoint}: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    seen = 0
    timeout_ms = None if args.timeout is None else int(args.timeout * 1000)
    try:
        while args.count is None or seen < args.count:
            if not socket.poll(timeout_ms):
                print(f"listen: no event for {args.timeout} s", file=sys.stderr)
                return 1
            topic, payload = socket.recv_multipart()[:2]
            try:
                event = json.loads(payload)
            except json.JSONDecodeError:
                kind = topic.decode(errors="replace")
                print(f"listen: skipped a malformed {kind!r} event", file=sys.stderr)
                continue
            print(payload.decode() if args.json else readable(event), flush=True)
            seen += 1
    finally:
        socket.close()
        context.term()
    return 0

