"""Typed hop messages: each hop round-trips through the real wire encoding, and anything missing or
mistyped is a rejected message, never a default. Also a stage's `take` over real ZeroMQ sockets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import zmq

from pipeline import wire
from pipeline.config import load_config
from pipeline.graph import Wiring, pipeline_graph
from pipeline.letterbox import Geometry, Letterbox
from pipeline.messages import HOPS, FrameRef, Kind, PreparedInput, Result, control, kind_of
from pipeline.stage import Stage
from pipeline.wire import Message, WireError

STAMPS = {"cap": 1, "cap_out": 2, "pre_in": 3, "pre_out": 4, "inf_in": 5, "inf_out": 6}


def _ref(**stamps: int) -> FrameRef:
    return FrameRef(7, 2, 14, (480, 640), {"index": 7, "pts": 0.233, "case": "c1", "sweep": 0},
                    dict(stamps or STAMPS))


def _prepared() -> PreparedInput:
    frame = np.random.default_rng(0).integers(0, 255, (480, 640), dtype=np.uint8)
    ready = Letterbox(224, 1)(frame)
    return PreparedInput(_ref(), ready.geometry, ready.content, ready.pixels)


def _roundtrip(msg: Message) -> Message:
    return wire.decode(wire.encode(msg))


def test_each_hop_survives_the_wire_unchanged() -> None:
    prepared = _prepared()
    back = PreparedInput.from_message(_roundtrip(prepared.message()))
    assert back.frame == prepared.frame and back.geometry == prepared.geometry
    assert back.content == prepared.content and np.array_equal(back.pixels, prepared.pixels)
    outputs = {"quality": np.array([0.25], np.float32), "mask": np.zeros((224, 224), np.uint8)}
    result = Result.from_message(_roundtrip(Result.of(prepared, outputs).message()))
    assert list(result.outputs) == ["quality", "mask"] and result.outputs["quality"][0] == 0.25
    assert result.frame.source["case"] == "c1" and result.frame.shape == (480, 640)
    ref = HOPS[Kind.FRAME](_roundtrip(_ref(cap=1, cap_out=2).message()))
    assert ref == _ref(cap=1, cap_out=2)


@pytest.mark.parametrize(("field", "value", "error"), [
    ("id", None, "missing field 'id'"),
    ("slot", "2", "field 'slot' must be an int"),
    ("seq", None, "missing field 'seq'"),
    ("shape", [480], "2 or 3 positive ints"),
    ("src", {"pts": 1.0}, "int 'index'"),
    ("t", {"cap": 1, "cap_out": 2, "pre_in": 3}, "without the timestamps ['pre_out']"),
    ("t", {**STAMPS, "lunch": 9}, "field 't' must map names"),
    ("geom", None, "missing field 'geom'"),
    ("geom", {"roi": [0, 0, 1], "offset": [0, 0], "content": [1, 1], "scale": [1, 1]}, "geometry.roi"),
    ("content", 1.5, "must lie in [0, 1]"),
    ("content", "all", "field 'content' must be a number"),
])
def test_a_missing_or_mistyped_field_is_a_rejected_message(field: str, value: object, error: str) -> None:
    header = copy.deepcopy(_prepared().message().header)
    if value is None:
        del header[field]
    else:
        header[field] = value
    with pytest.raises(WireError, match=error.replace("[", r"\[").replace("]", r"\]")):
        PreparedInput.from_message(Message("input", header, (np.zeros((224, 224), np.uint8),)))


def test_result_needs_one_named_tensor_per_output() -> None:
    msg = Result.of(_prepared(), {"quality": np.zeros(1, np.float32)}).message()
    with pytest.raises(WireError, match="1 output names for 2 tensors"):
        Result.from_message(Message(msg.kind, msg.header, (*msg.arrays, msg.arrays[0])))
    with pytest.raises(WireError, match="expected a result message"):
        Result.from_message(Message("input", msg.header, msg.arrays))


def test_geometry_is_strict() -> None:
    good = Geometry((0, 0, 640, 480), (0, 28.0), (224, 168.0), (0.35, 0.35))
    assert Geometry.from_wire(good.as_wire()) == good
    with pytest.raises(ValueError, match="exactly roi"):
        Geometry.from_wire({"roi": [0, 0, 1, 1]})
    with pytest.raises(ValueError, match="geometry.roi"):
        Geometry.from_wire({**good.as_wire(), "roi": [0.5, 0, 1, 1]})


def test_kinds_are_one_enumeration() -> None:
    assert kind_of(control(Kind.WANT, {"n": 2})) is Kind.WANT
    assert kind_of(Message("hullo", {})) is None
    assert {k.value for k in Kind} >= {"frame", "input", "result", "want", "eos", "hello", "ready", "go",
                                       "drain", "exit", "report", "done", "error", "health"}


class _Receiver(Stage):
    stamp_in = "inf_in"

    def step(self, ready: bool) -> None:  # not run: the test calls take() itself
        raise AssertionError


def test_take_over_real_sockets_keeps_good_hops_and_counts_the_rest() -> None:
    """A peer that sends garbage, the wrong kind, or a hop with a field missing costs a counted rejection;
    the good hops arrive typed and stamped, and the end of stream is seen."""
    context = zmq.Context()
    graph = pipeline_graph()
    wiring = Wiring.for_run(graph, "/nonexistent", supervisor_pid=0)
    wiring.endpoints["inputs"] = "inproc://inputs"
    config = load_config(overrides={"transport.policy": "lossless"})
    sender = context.socket(zmq.ROUTER)
    sender.bind("inproc://inputs")
    stage = _Receiver("infer", "infer", config, wiring, {"main": None}, context)  # type: ignore[dict-item]
    try:
        sock = stage.open("inputs")
        wire.send(sock, control(Kind.WANT, {"n": 4}), block=True)
        peer = sender.recv_multipart()[0]
        good = _prepared()
        broken = good.message()
        del broken.header["geom"]
        for msg in (good.message(), broken, Message("frame", good.message().header), good.message()):
            assert wire.send(sender, msg, block=True, to=peer)
        sender.send_multipart([peer, b"\xc1not msgpack"])
        wire.send(sender, control(Kind.EOS), block=True, to=peer)
        hops, end = [], False
        for _ in range(100):
            if sock.poll(100):
                taken, end = stage.take(sock, keep=8)
                hops += taken
            if end:
                break
        assert end and len(hops) == 2
        assert all(isinstance(h, PreparedInput) and "inf_in" in h.frame.stamps for h in hops)
        assert stage.counters["rejected"] == 3 and stage.counters["received"] == 2
        with pytest.raises(KeyError, match="does not declare"):
            stage.counters["invented"] += 1
    finally:
        stage.close_sockets()
        sender.close(0)
        context.term()
