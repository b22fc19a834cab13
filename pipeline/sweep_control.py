"""Mark sweeps by hand on a running pipeline: `start` opens a sweep at the next frame, `stop` ends it;
`exam_end` ends the exam (its exam_summary follows its open sweep's end).

From the first command on, only the operator's commands delimit sweeps (the source's sweep metadata and the
automatic probe-lifted / gap rules stop splitting them), as a sonographer with a foot switch would expect.
Talks to the pipeline's postprocess.control endpoint (a ZeroMQ REP socket); prints the reply and exits 0,
or prints one error line and exits 1 when the pipeline does not answer or refuses the command.
"""

from __future__ import annotations

import argparse
import json
import sys

import zmq

from pipeline.security import ClientKeys, KeyFolderError
from pipeline.sweep import EXAM_END, OPERATOR_COMMANDS


def send_command(endpoint: str, command: str, timeout_s: float, keys: ClientKeys | None = None) -> dict:
    """One request/reply; raises TimeoutError when no pipeline answers in time (or it refused `keys`)."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(socket)
    socket.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    try:
        socket.connect(endpoint)
        socket.send_json({"command": command})
        try:
            return socket.recv_json()
        except zmq.Again:
            raise TimeoutError(f"no answer from {endpoint} within {timeout_s:g} s") from None
    finally:
        socket.close()


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-sweep-control` command: 0 when the pipeline accepted the command, else 1."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=(*OPERATOR_COMMANDS, EXAM_END),
                        help="start or stop a sweep, or end the exam")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5557",
                        help="the pipeline's postprocess.control endpoint (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    parser.add_argument("--curve-keys", metavar="DIR",
                        help="client key folder (DIR/client-NAME from tools/keys.py) for a run with "
                        "transport.curve_keys")
    args = parser.parse_args(argv)
    try:
        keys = None if args.curve_keys is None else ClientKeys.load(args.curve_keys)
        reply = send_command(args.endpoint, args.command, args.timeout, keys)
    except (TimeoutError, KeyFolderError) as exc:
        print(f"sweep_control: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply))
    return 0 if reply.get("ok") else 1

