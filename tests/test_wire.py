from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.wire import (
    WIRE_VERSION,
    ZERO_COPY_MIN_BYTES,
    Message,
    WireError,
    decode,
    encode,
    recv,
    recv_routed,
    send,
)

WIRE_DTYPES = ["b1", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"]

SAMPLES = [
    Message("frame", {"frame_id": 7, "slot": 1, "seq": 42, "t": 1.5}),
    Message("embedding", {"frame_id": 8}, (np.linspace(0, 1, 768, dtype=np.float32),)),
    Message(
        "mixed",
        {"name": "ü", "blob": b"\x00\xff", "nested": {"a": [1, 2, None]}, "flag": True},
        (
            np.zeros((0, 3), np.uint8),
            np.array(3.25),
            np.arange(24, dtype=np.int16).reshape(2, 3, 4)[:, ::2],
            np.array([True, False]),
            np.ones((2, 1, 1, 1, 1, 3), np.float16),
        ),
    ),
    Message("big", {}, (np.arange(ZERO_COPY_MIN_BYTES, dtype=np.uint32), np.full((300, 300), 9, np.uint8))),
]


def assert_same(got: Message, want: Message) -> None:
    assert got.kind == want.kind
    assert got.header == want.header
    assert len(got.arrays) == len(want.arrays)
    for g, w in zip(got.arrays, want.arrays, strict=True):
        assert g.dtype == w.dtype.newbyteorder("<")
        assert g.shape == w.shape
        assert g.tobytes() == np.ascontiguousarray(w, dtype=g.dtype).tobytes()
        assert not g.flags.writeable


def received_buffer(arr: np.ndarray) -> object:
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview)
    return base.obj


def as_bytes(parts: list) -> list[bytes]:
    return [bytes(memoryview(p)) for p in parts]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.kind)
def test_encode_decode_round_trip(msg: Message) -> None:
    assert_same(decode(encode(msg)), msg)
    assert_same(decode(as_bytes(encode(msg))), msg)


def test_big_endian_input_is_sent_little_endian() -> None:
    arr = np.arange(5, dtype=">u2")
    got = decode(encode(Message("x", {}, (arr,))))
    assert got.arrays[0].dtype == np.dtype("<u2")
    assert got.arrays[0].tolist() == arr.tolist()


@pytest.fixture
def push_pull(tmp_path):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    for sock in (pull, push):
        sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/w.sock"
    pull.bind(endpoint)
    push.connect(endpoint)
    pull.setsockopt(zmq.RCVTIMEO, 5000)
    yield push, pull
    push.close()
    pull.close()
    ctx.term()


def test_round_trip_over_ipc(push_pull) -> None:
    push, pull = push_pull
    assert recv(pull) is None
    for msg in SAMPLES:
        assert send(push, msg, block=True)
    for msg in SAMPLES:
        got = recv(pull, block=True)
        assert got is not None
        assert_same(got, msg)
        for arr in got.arrays:
            assert isinstance(received_buffer(arr), zmq.Frame)  # zero-copy over the received frame


def test_send_without_peer_returns_false() -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 1)
    try:
        push.bind("inproc://nobody")
        assert send(push, SAMPLES[1]) is False
    finally:
        push.close()
        ctx.term()


def test_send_returns_false_once_peer_hwm_is_full(tmp_path) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        for sock, opt in ((pull, zmq.RCVHWM), (push, zmq.SNDHWM)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(opt, 1)
        pull.bind(f"ipc://{tmp_path}/hwm.sock")
        push.connect(f"ipc://{tmp_path}/hwm.sock")
        msg = Message("blob", {}, (np.zeros(16384, np.uint8),))
        sent = 0
        while send(push, msg):
            sent += 1
            assert sent < 10_000, "HWM never reached"
        assert recv(pull, block=True) is not None
    finally:
        push.close()
        pull.close()
        ctx.term()


@pytest.mark.parametrize(
    ("head", "buffers", "error"),
    [
        ({"v": 7, "k": "x", "h": {}, "b": []}, [], "unknown wire version 7"),
        ({"v": True, "k": "x", "h": {}, "b": []}, [], "unknown wire version"),
        ({"v": 1, "k": "x", "h": {}, "b": [["u1", [2]]]}, [], "expected 2 parts, got 1"),
        ({"v": 1, "k": "x", "h": {}, "b": []}, [b"x"], "expected 1 parts, got 2"),
        ({"v": 1, "k": "x", "h": {}, "b": [["u1", [10, 15]]]}, [b"\0" * 100], "100 bytes, expected 150"),
        ({"v": 1, "k": "x", "h": {}, "b": [["O", [1]]]}, [b"\0" * 8], "dtype 'O' not allowed"),
        ({"v": 1, "k": "x", "h": {}, "b": [["u1", [-1]]]}, [b""], "must hold ints in"),
        ({"v": 1, "k": "x", "h": {}, "b": [["u1", [1] * 7]]}, [b"\0"], "at most 6"),
        ({"v": 1, "k": "", "h": {}, "b": []}, [], "kind"),
        ({"v": 1, "k": "x", "h": [], "b": []}, [], "header must be a map"),
        ({"v": 1, "k": "x", "h": {}, "b": [], "extra": 1}, [], "keys"),
        ([1, 2, 3], [], "keys"),
    ],
)
def test_malformed_messages_are_named(head, buffers, error) -> None:
    with pytest.raises(WireError, match=error):
        decode([msgpack.packb(head), *buffers])


@pytest.mark.parametrize(
    "parts",
    [[], [b"\xc1"], [b"\x84"], [b"\x81\x01\x02"], [msgpack.packb({"v": 1}) + b"\x00"], [object()], [None]],
)
def test_garbage_is_wire_error(parts) -> None:
    with pytest.raises(WireError):
        decode(parts)


def test_header_ext_types_rejected() -> None:
    head = msgpack.packb({"v": 1, "k": "x", "h": {"t": msgpack.ExtType(3, b"ab")}, "b": []})
    with pytest.raises(WireError, match="msgpack"):
        decode([head])


def test_encode_rejects_unsendable() -> None:
    with pytest.raises(WireError, match="dtype 'object' not allowed"):
        encode(Message("x", {}, (np.array([None]),)))
    with pytest.raises(WireError, match="header key"):
        encode(Message("x", {1: 2}))
    with pytest.raises(WireError, match="serializable"):
        encode(Message("x", {"a": object()}))


# ---- property tests -------------------------------------------------------------------------------

header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
headers = st.dictionaries(st.text(max_size=12), header_values, max_size=6)
arrays = hnp.arrays(
    dtype=st.sampled_from(WIRE_DTYPES).map(lambda code: np.dtype("<" + code)),
    shape=hnp.array_shapes(min_dims=0, max_dims=6, min_side=0, max_side=4),
)
messages = st.builds(
    Message,
    kind=st.text(min_size=1, max_size=16),
    header=headers,
    arrays=st.lists(arrays, max_size=4).map(tuple),
)


@given(messages)
def test_property_round_trip(msg: Message) -> None:
    assert_same(decode(as_bytes(encode(msg))), msg)


def decode_or_wire_error(parts) -> None:
    try:
        result = decode(parts)
    except WireError:
        return
    assert isinstance(result, Message)


@given(st.lists(st.binary(max_size=64), max_size=5))
def test_property_random_bytes_never_crash(parts: list[bytes]) -> None:
    decode_or_wire_error(parts)


descriptor_items = header_values | st.sampled_from(WIRE_DTYPES) | st.lists(st.integers(-2, 3), max_size=7)
near_valid_heads = st.fixed_dictionaries(
    {
        "v": st.just(WIRE_VERSION) | header_values,
        "k": st.just("x") | header_values,
        "h": headers | header_values,
        "b": st.lists(st.lists(descriptor_items, max_size=3), max_size=3),
    }
)


@given(header_values | near_valid_heads, st.lists(st.binary(max_size=16), max_size=3))
def test_property_random_headers_never_crash(head, buffers) -> None:
    decode_or_wire_error([msgpack.packb(head), *buffers])


@given(messages, st.data())
def test_property_corrupted_parts_rejected(msg: Message, data: st.DataObject) -> None:
    parts = as_bytes(encode(msg))
    n_buffers = len(parts) - 1
    corruptions = ["extra", "missing_head", "flip"]
    if n_buffers:
        corruptions += ["missing", "truncate", "grow"]
    how = data.draw(st.sampled_from(corruptions))
    if how == "extra":
        parts.insert(data.draw(st.integers(1, len(parts))), data.draw(st.binary(max_size=8)))
    elif how == "missing_head":
        parts = parts[1:]
    elif how == "missing":
        del parts[data.draw(st.integers(1, n_buffers))]
    elif how in ("truncate", "grow"):
        i = data.draw(st.integers(1, n_buffers))
        if how == "grow":
            parts[i] += data.draw(st.binary(min_size=1, max_size=8))
        elif parts[i]:
            parts[i] = parts[i][: data.draw(st.integers(0, len(parts[i]) - 1))]
        else:
            parts[i] = b"\0"
    else:
        head = bytearray(parts[0])
        pos = data.draw(st.integers(0, len(head) - 1))
        head[pos] ^= data.draw(st.integers(1, 255))
        parts[0] = bytes(head)
        decode_or_wire_error(parts)  # a flipped header byte can still be a valid (different) message
        return
    with pytest.raises(WireError):
        decode(parts)


@settings(max_examples=50)
@given(
    version=st.integers(-5, 100).filter(lambda v: v != WIRE_VERSION),
    dtype=st.text(max_size=6).filter(lambda d: d not in WIRE_DTYPES),
    dim=st.integers(-(2**63), -1),
)
def test_property_bad_descriptors_rejected(version: int, dtype: str, dim: int) -> None:
    good = {"v": WIRE_VERSION, "k": "x", "h": {}, "b": [["u1", [2]]]}
    for patch in ({"v": version}, {"b": [[dtype, [2]]]}, {"b": [["u1", [dim]]]}):
        with pytest.raises(WireError):
            decode([msgpack.packb({**good, **patch}), b"\0\0"])


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**40, 2**40], [2**31]])
def test_absurd_dimensions_are_rejected_not_crashing(shape: list[int]) -> None:
    header = msgpack.packb({"v": WIRE_VERSION, "k": "frame", "h": {}, "b": [["u1", shape]]})
    with pytest.raises(WireError):
        decode([header, b""])


def test_routed_send_and_receive(tmp_path) -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, b"worker-1")
    try:
        router.bind(f"ipc://{tmp_path}/r")
        dealer.connect(f"ipc://{tmp_path}/r")
        assert send(dealer, Message("want", {"n": 3}), block=True)
        assert router.poll(5000)
        sender, msg = recv_routed(router)
        assert sender == b"worker-1" and msg.kind == "want" and msg.header == {"n": 3}
        array = np.arange(6, dtype=np.float32).reshape(2, 3)
        assert send(router, Message("input", {"id": 1}, (array,)), to=sender)
        assert dealer.poll(5000)
        reply = recv(dealer)
        assert reply.kind == "input" and np.array_equal(reply.arrays[0], array)
        assert recv_routed(router) is None
    finally:
        router.close()
        dealer.close()
        context.term()
