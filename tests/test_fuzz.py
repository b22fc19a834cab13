"""Fuzzing with hypothesis: the hop decoders take any header without an exception other than WireError,
and every stage's receive path, fed malformed messages from a real socket while a real run goes on,
neither crashes nor lets one through: each is counted as `rejected`, exactly once.

Every generated message is a valid one broken in one way (a field dropped or mistyped, another kind, a
wire version from elsewhere, a tensor of the wrong shape or dtype or holding NaN, garbage bytes), so the
expected count is the number sent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq
from conftest import socket_dirs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_remote import (
    REFERENCE,
    WAIT_S,
    free_port,
    start_run,
    start_worker,
    stop,
    subscriber,
    wait_for_frames,
)

from engines.bundle import load_bundle
from pipeline.letterbox import Geometry
from pipeline.messages import HOPS, FrameRef, Kind, PreparedInput, RefineRequest, Result, control
from pipeline.metrics import STAMPS
from pipeline.steps import output_problem
from pipeline.wire import Message, WireError, decode, encode

BUNDLE = load_bundle(REFERENCE)
EXAMPLES = 60  # malformed messages per receive path
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _frame(frame_id: int = 3) -> FrameRef:
    return FrameRef(frame_id, 0, 1, (240, 320), {"index": frame_id}, dict.fromkeys(STAMPS[:6], 1))


GEOMETRY = Geometry((0, 0, 320, 240), (0, 28.0), (224, 168.0), (0.7, 0.7))


def _outputs() -> dict[str, np.ndarray]:
    return {name: np.zeros(spec.shape, spec.dtype) for name, spec in BUNDLE.outputs.items()}


TEMPLATES: dict[str, Message] = {
    "input": PreparedInput(_frame(), GEOMETRY, 0.5, np.zeros(BUNDLE.input.frame_shape, np.uint8)).message(),
    "result": Result(_frame(), GEOMETRY, 0.5, _outputs()).message(),
    "refine": RefineRequest((1, 2), 0).message(),
    "want": control(Kind.WANT, {"n": 1, "ask": 1, "bundle": BUNDLE.sha256, "relay": False}),
}
# A value no field of any hop accepts (each wants an int, a bool, a number in [0, 1], a list of ints or
# names, a map with required keys, or the bundle's 64-digit hash).
WRONG = st.one_of(st.none(), st.text(max_size=8), st.binary(max_size=8), st.just([None]), st.just({}))
OTHER_KINDS = st.sampled_from([k.value for k in Kind if k is not Kind.EOS]) | st.text(min_size=1, max_size=8)


@st.composite
def broken(draw: Any, template: str) -> list[bytes]:
    """The template message, broken in one way, as wire parts."""
    msg = TEMPLATES[template]
    how = draw(st.sampled_from(["drop", "mistype", "kind", "version", "garbage", "tensor"]))
    header = dict(msg.header)
    arrays = list(msg.arrays)
    if how == "drop":
        del header[draw(st.sampled_from(sorted(header)))]
    elif how == "mistype":
        header[draw(st.sampled_from(sorted(header)))] = draw(WRONG)
    elif how == "kind":
        kind = draw(OTHER_KINDS.filter(lambda k: k != msg.kind))
        if template == "want":  # a worker may also send results and its end; those are checked apart
            kind = draw(st.sampled_from(["frame", "input", "refine", "hello", "go"]))
        return encode(Message(kind, header, tuple(arrays)))
    elif how == "version":
        head = msgpack.unpackb(encode(msg)[0])
        head["v"] = draw(st.integers(-2**63, 2**63 - 1).filter(lambda v: v != 1) | st.text(max_size=4))
        return [msgpack.packb(head), *encode(msg)[1:]]
    elif how == "garbage":
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    elif how == "tensor" and arrays:
        i = draw(st.integers(0, len(arrays) - 1))
        flaw = draw(st.sampled_from(["shape", "dtype", "nan", "missing"] if arrays[i].dtype.kind == "f"
                                    else ["shape", "dtype", "missing"]))
        if flaw == "missing":
            del arrays[i]
        elif flaw == "shape":
            arrays[i] = np.zeros((*arrays[i].shape, 2), arrays[i].dtype)
        elif flaw == "dtype":
            arrays[i] = arrays[i].astype(np.float64 if arrays[i].dtype != np.float64 else np.uint8)
        else:
            arrays[i] = np.full(arrays[i].shape, draw(st.sampled_from([np.nan, np.inf, -np.inf])),
                                arrays[i].dtype)
    else:  # a message without tensors: mistype a field instead
        header[draw(st.sampled_from(sorted(header)))] = draw(WRONG)
    return encode(Message(msg.kind, header, tuple(arrays)))


@FUZZ
@given(st.sampled_from(["input", "result", "refine"]).flatmap(lambda t: st.tuples(st.just(t), broken(t))))
def test_hop_decoders_raise_only_wire_errors(case: tuple[str, list[bytes]]) -> None:
    template, parts = case
    try:
        hop = HOPS[Kind(template)](decode(parts))
    except WireError:
        return
    # Decoded: then it broke a tensor in a way only the receiving stage, knowing its bundle, can tell.
    if template == "input":
        assert (hop.pixels.dtype, hop.pixels.shape) != (np.uint8, BUNDLE.input.frame_shape)
    else:
        assert template == "result" and output_problem(BUNDLE, hop.outputs) is not None


def _run_socket_dir(before: set[str]) -> Path:
    """The socket folder of the run started after `before` (the one with a remote-results link)."""
    found = [Path("/tmp") / name for name in socket_dirs() - before
             if (Path("/tmp") / name / "remote_results").exists()]
    assert len(found) == 1, found
    return found[0]


def fuzz_socket(sock: zmq.Socket, template: str, counted: Any, to: bytes | None = None) -> None:
    """Send broken `template` messages on `sock` (to the peer `to`, on a ROUTER), calling `counted` for
    each one sent."""
    @FUZZ
    @given(broken(template))
    def send_one(parts: list[bytes]) -> None:
        sock.send_multipart(parts if to is None else [to, *parts])
        counted()

    send_one()


def fuzz_operator(requests: zmq.Socket) -> list[dict]:
    """Requests that are no operator command (bytes, JSON of other shapes), each answered."""
    replies = []
    commands = st.sampled_from(["start", "stop"])
    not_a_command = st.one_of(
        st.binary(max_size=64).filter(lambda b: b.strip() not in (b"start", b"stop")),
        st.dictionaries(st.text(max_size=8), st.none() | st.integers() | st.text(max_size=8), max_size=3)
        .filter(lambda d: d.get("command") not in ("start", "stop")).map(lambda d: json.dumps(d).encode()),
        commands.map(lambda c: json.dumps({"command": c.upper()}).encode()))

    @FUZZ
    @given(not_a_command)
    def ask(request: bytes) -> None:
        requests.send(request)
        replies.append(requests.recv_json())

    ask()
    return replies


def test_every_stage_receive_path_counts_each_malformed_message_and_goes_on(tmp_path: Path) -> None:
    """A run with a local infer worker and a loopback remote endpoint: malformed results into
    postprocess (its results link and the relay's), refine requests and worker messages into preprocess
    (its refine link and its work ROUTER over TCP), requests that are no command into the operator's REP.
    The run keeps scoring and ends cleanly, and each stage counts exactly what it was sent."""
    remote, events = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    operator = f"tcp://127.0.0.1:{free_port()}"
    before = socket_dirs()
    run = start_run(tmp_path / "run", remote, events, "synthetic://320x240?fps=30&frames=100000", "--quiet",
                    "--set", "infer.workers=1", "--control", operator)
    context = zmq.Context()
    listener = subscriber(context, events, None)
    sent = {"preprocess": 0, "postprocess": 0}
    targets: list[tuple[zmq.Socket, str, str]] = []
    try:
        wait_for_frames(listener, 5, run)
        folder = _run_socket_dir(before)
        for link, stage, template, kind in (("results", "postprocess", "result", zmq.PUSH),
                                            ("remote_results", "postprocess", "result", zmq.PUSH),
                                            ("refine", "preprocess", "refine", zmq.PUSH),
                                            (None, "preprocess", "want", zmq.DEALER)):
            sock = context.socket(kind)
            sock.sndtimeo = 5000
            sock.connect(remote if link is None else f"ipc://{folder}/{link}")
            targets.append((sock, stage, template))

        for sock, stage, template in targets:
            fuzz_socket(sock, template, lambda stage=stage: sent.__setitem__(stage, sent[stage] + 1))
        requests = context.socket(zmq.REQ)
        requests.rcvtimeo = WAIT_S * 1000
        requests.connect(operator)
        targets.append((requests, "postprocess", "operator"))
        replies = fuzz_operator(requests)
        for sock, _, _ in targets:
            sock.close(linger=5000)  # every message handed over before the run is stopped
        wait_for_frames(listener, 30, run)  # postprocess and preprocess have read all of them since
    finally:
        for sock in [listener, *(target[0] for target in targets)]:
            sock.close(linger=0)
        context.term()
        code, log = stop(run)
    assert code == 0, log[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rejected = {stage: summary["stages"][stage]["counters"].get("rejected", 0) for stage in sent}
    assert rejected == sent and min(sent.values()) >= EXAMPLES
    operator_rejected = summary["stages"]["postprocess"]["counters"]["operator_rejected"]
    assert replies and all(not reply["ok"] for reply in replies) and operator_rejected == len(replies)
    assert summary["frames"]["scored"] > 30


def test_a_remote_worker_counts_each_malformed_work_message_and_ends_cleanly(tmp_path: Path) -> None:
    """The infer stage's receive path, in a real worker process served by this test's ROUTER: malformed
    inputs are counted and skipped, and the end of stream still ends it (exit 0)."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.rcvtimeo = 90_000
    port = router.bind_to_random_port("tcp://127.0.0.1")
    worker = start_worker(f"tcp://127.0.0.1:{port}", None, "fuzzed")
    sent: list[int] = []
    count = 0
    try:
        identity, *parts = router.recv_multipart()
        want = decode(parts)
        assert want.kind == "want" and want.header["relay"] is True
        assert want.header["bundle"] == BUNDLE.sha256

        fuzz_socket(router, "input", lambda: sent.append(1), to=identity)
        count = len(sent)
        router.send_multipart([identity, *encode(control(Kind.EOS))])
        code, log = stop_after_eos(worker)
    finally:
        router.close(linger=0)
        context.term()
        if worker.poll() is None:
            worker.kill()
    assert code == 0, log[-3000:]
    assert count > 0 and f"done, 0 frames scored, {count} messages rejected" in log


def stop_after_eos(worker: subprocess.Popen) -> tuple[int, str]:
    """The worker's exit once the end of stream reached it (it ends itself; no signal)."""
    try:
        output, _ = worker.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        return stop(worker)
    return worker.returncode, output
