"""The single wire format between pipeline stages: a msgpack header part followed by raw array buffers.

Every stage decodes strictly, so a buggy or hostile peer produces a `WireError` rather than a crash or
an unbounded allocation further down the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import msgpack
import numpy as np
import zmq

WIRE_VERSION = 1
ZERO_COPY_MIN_BYTES = 65536
MAX_NDIM = 6
MAX_DIM = 2**31 - 1  # per dimension; numpy refuses larger ones even for empty arrays
# The header part only carries small metadata; anything bigger is treated as garbage.
MAX_HEADER_BYTES = 1 << 20

# Wire dtype codes are numpy codes without the byte-order character; multi-byte types are little-endian.
_ALLOWED_DTYPES = {
    code: np.dtype("<" + code)
    for code in ("b1", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8")
}
_HEADER_KEYS = {"v", "k", "h", "b"}


class WireError(ValueError):
    """A message that does not follow the wire format."""


@dataclass(frozen=True)
class Message:
    kind: str
    header: dict
    arrays: tuple[np.ndarray, ...] = ()


def _check_kind_and_header(kind: Any, header: Any) -> None:
    if not isinstance(kind, str) or not kind:
        raise WireError(f"kind must be a non-empty str, got {kind!r}")
    if not isinstance(header, dict):
        raise WireError(f"header must be a map, got {type(header).__name__}")
    for key in header:
        if not isinstance(key, str):
            raise WireError(f"header key {key!r} is not a str")


def _wire_array(arr: np.ndarray) -> tuple[str, np.ndarray]:
    """Return the wire dtype code and a C-contiguous little-endian copy-or-view of `arr`."""
    arr = np.asarray(arr)
    code = f"{arr.dtype.kind}{arr.dtype.itemsize}" if arr.dtype.kind in "buif" else ""
    if code not in _ALLOWED_DTYPES:
        raise WireError(f"dtype {arr.dtype.name!r} not allowed")
    if arr.ndim > MAX_NDIM:
        raise WireError(f"ndim {arr.ndim} exceeds {MAX_NDIM}")
    return code, np.asarray(arr, dtype=_ALLOWED_DTYPES[code], order="C")


def encode(msg: Message) -> list:
    """Serialize `msg` into ZMQ parts; array parts are flat uint8 views, not copies, when possible."""
    _check_kind_and_header(msg.kind, msg.header)
    descs, buffers = [], []
    for arr in msg.arrays:
        code, flat = _wire_array(arr)
        descs.append([code, list(flat.shape)])
        buffers.append(flat.reshape(-1).view(np.uint8))
    try:
        head = msgpack.packb(
            {"v": WIRE_VERSION, "k": msg.kind, "h": msg.header, "b": descs}, use_bin_type=True
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"header is not msgpack-serializable: {exc}") from exc
    return [head, *buffers]


def _describe(code: str, shape: list[int]) -> str:
    return f"{_ALLOWED_DTYPES[code].name}[{','.join(map(str, shape))}]"


def _parse_desc(i: int, desc: Any) -> tuple[np.dtype, list[int], str]:
    if not isinstance(desc, list) or len(desc) != 2:
        raise WireError(f"buffer {i}: descriptor must be [dtype, shape]")
    code, shape = desc
    if not isinstance(code, str) or code not in _ALLOWED_DTYPES:
        raise WireError(f"buffer {i}: dtype {code!r} not allowed")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise WireError(f"buffer {i}: shape must be a list of at most {MAX_NDIM} dims")
    if not all(type(n) is int and 0 <= n <= MAX_DIM for n in shape):
        raise WireError(f"buffer {i}: shape {shape!r} must hold ints in [0, {MAX_DIM}]")
    return _ALLOWED_DTYPES[code], shape, _describe(code, shape)


def _reject_ext(code: int, data: bytes) -> None:
    raise ValueError(f"msgpack ext type {code} not allowed")


def decode(parts: Sequence[bytes | memoryview | zmq.Frame]) -> Message:
    """Parse received parts strictly; arrays are read-only zero-copy views over the part buffers."""
    try:
        views = [memoryview(p).cast("B") for p in parts]
    except (TypeError, ValueError) as exc:
        raise WireError(f"parts must be contiguous buffers: {exc}") from exc
    if not views:
        raise WireError("expected at least 1 part, got 0")
    if views[0].nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header of {views[0].nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        # unpackb bounds every container and string by the input length, so the cap above bounds memory.
        head = msgpack.unpackb(views[0], raw=False, strict_map_key=True, ext_hook=_reject_ext)
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise WireError("header is not valid msgpack") from exc
    if not isinstance(head, dict) or set(head) != _HEADER_KEYS:
        raise WireError(f"header must be a map with keys {sorted(_HEADER_KEYS)}")
    version = head["v"]
    if type(version) is not int or version != WIRE_VERSION:
        raise WireError(f"unknown wire version {version!r}")
    _check_kind_and_header(head["k"], head["h"])
    descs = head["b"]
    if not isinstance(descs, list):
        raise WireError("buffer descriptors must be a list")
    if len(views) != len(descs) + 1:
        raise WireError(f"expected {len(descs) + 1} parts, got {len(views)}")
    arrays = []
    for i, (desc, view) in enumerate(zip(descs, views[1:], strict=True)):
        dtype, shape, described = _parse_desc(i, desc)
        expected = prod(shape) * dtype.itemsize
        if view.nbytes != expected:
            raise WireError(f"buffer {i}: {view.nbytes} bytes, expected {expected} for {described}")
        arr = np.frombuffer(view, dtype=dtype).reshape(shape)
        arr.flags.writeable = False
        arrays.append(arr)
    return Message(head["k"], head["h"], tuple(arrays))


def send(socket: zmq.Socket, msg: Message, *, block: bool = False, to: bytes | None = None) -> bool:
    """Send `msg` (to the peer with routing id `to`, on a ROUTER); False means the peer could not take it
    (HWM or SNDTIMEO) and the caller drops it."""
    parts = encode(msg) if to is None else [to, *encode(msg)]
    flags = 0 if block else zmq.NOBLOCK
    last = len(parts) - 1
    try:
        # libzmq only refuses the first part of a multipart message, so Again never leaves a partial send.
        for i, part in enumerate(parts):
            socket.send(part, flags | (zmq.SNDMORE if i < last else 0), copy=len(part) < ZERO_COPY_MIN_BYTES)
    except zmq.Again:
        return False
    return True


def recv(socket: zmq.Socket, *, block: bool = False) -> Message | None:
    """Receive and decode one message; None when nothing is waiting (or RCVTIMEO expired)."""
    try:
        frames = socket.recv_multipart(0 if block else zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    return decode(frames)


def recv_routed(socket: zmq.Socket) -> tuple[bytes, Message] | None:
    """Non-blocking receive on a ROUTER: (sender's routing id, message), or None when nothing waits."""
    try:
        frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    return frames[0].bytes, decode(frames[1:])
