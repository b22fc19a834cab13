"""What travels between stages: one enumeration of message kinds and a frozen type per data hop.

    capture --FrameRef--> preprocess --PreparedInput--> infer --Result--> postprocess
                              ^-------------------- RefineRequest --------------------'

Each hop type encodes itself into a `wire.Message` and decodes one strictly: a missing field, a wrong type
or a timestamp the hop must carry but does not is a `WireError` (a rejected, counted message), never a
default filled in downstream. Timestamps (`stamps`, monotonic ns, names from `metrics.STAMPS`) are the one
part that grows on the way: each stage adds its in/out times to the same dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from .letterbox import Geometry
from .metrics import STAMPS
from .wire import Message, WireError


class Kind(str, Enum):
    """Every message kind of the run: data hops, flow control on data sockets, and the control channel."""

    # data hops
    FRAME = "frame"  # capture -> preprocess
    INPUT = "input"  # preprocess -> infer
    RESULT = "result"  # infer -> postprocess
    REFINE = "refine"  # postprocess -> preprocess: the unscored frames to score next (lookback refinement)
    # flow control on data sockets
    WANT = "want"  # infer -> preprocess: "send me up to n frames"
    EOS = "eos"  # end of stream, passed down the graph
    # stage -> supervisor
    HELLO = "hello"
    READY = "ready"
    REPORT = "report"
    DONE = "done"
    ERROR = "error"
    # supervisor -> stage
    GO = "go"
    DRAIN = "drain"
    EXIT = "exit"
    HEALTH = "health"


def control(kind: Kind, header: dict[str, Any] | None = None, arrays: tuple[np.ndarray, ...] = ()
            ) -> Message:
    return Message(kind.value, header or {}, arrays)


def kind_of(msg: Message) -> Kind | None:
    """The message's kind, or None for a kind this version does not know."""
    try:
        return Kind(msg.kind)
    except ValueError:
        return None


# Timestamps a hop must already carry when it is sent (the sender's own out-stamp included).
_REQUIRED_STAMPS = {Kind.FRAME: STAMPS[:2], Kind.INPUT: STAMPS[:4], Kind.RESULT: STAMPS[:6]}


def _field(header: Mapping[str, Any], key: str, kinds: tuple[type, ...], what: str) -> Any:
    if key not in header:
        raise WireError(f"missing field {key!r}")
    value = header[key]
    if type(value) not in kinds:
        raise WireError(f"field {key!r} must be {what}, got {value!r}")
    return value


@dataclass(frozen=True)
class FrameRef:
    """A full-resolution frame in the ring: its id, where it lies (slot, seqlock sequence), its shape, what
    the source said of it (`index`, `pts` and the source's own metadata: case, sweep, pixel spacing...)."""

    id: int
    slot: int
    seq: int
    shape: tuple[int, ...]
    source: dict[str, Any]
    stamps: dict[str, int]

    def header(self) -> dict[str, Any]:
        return {"id": self.id, "slot": self.slot, "seq": self.seq, "shape": list(self.shape),
                "src": self.source, "t": self.stamps}

    def message(self) -> Message:
        return Message(Kind.FRAME.value, self.header())

    @classmethod
    def from_header(cls, header: Mapping[str, Any], kind: Kind) -> FrameRef:
        frame_id = _field(header, "id", (int,), "an int")
        slot = _field(header, "slot", (int,), "an int")
        seq = _field(header, "seq", (int,), "an int")
        shape = _field(header, "shape", (list,), "a list")
        if not 2 <= len(shape) <= 3 or not all(type(n) is int and n > 0 for n in shape):
            raise WireError(f"field 'shape' must be 2 or 3 positive ints, got {shape!r}")
        source = _field(header, "src", (dict,), "a map")
        if type(source.get("index")) is not int or type(source.get("pts", 0)) not in (int, float, type(None)):
            raise WireError("field 'src' must hold an int 'index' and a numeric or null 'pts'")
        stamps = _field(header, "t", (dict,), "a map")
        if not all(name in STAMPS and type(ns) is int for name, ns in stamps.items()):
            raise WireError(f"field 't' must map names of {STAMPS} to ints")
        missing = [name for name in _REQUIRED_STAMPS[kind] if name not in stamps]
        if missing:
            raise WireError(f"a {kind.value} message without the timestamps {missing}")
        return cls(frame_id, slot, seq, tuple(shape), source, stamps)


@dataclass(frozen=True)
class PreparedInput:
    """A frame made ready for the model: the model input tensor and the geometry back to the frame."""

    frame: FrameRef
    geometry: Geometry
    content: float  # share of the model input that is tissue (letterbox.content_fraction)
    pixels: np.ndarray
    refined: bool = False  # sent again from preprocess's history (lookback refinement), not as the newest

    def message(self) -> Message:
        return Message(Kind.INPUT.value, {**self.frame.header(), "geom": self.geometry.as_wire(),
                                          "content": self.content, "refined": self.refined}, (self.pixels,))

    @classmethod
    def from_message(cls, msg: Message) -> PreparedInput:
        frame, geometry, content, refined = _prepared_fields(msg, Kind.INPUT)
        if len(msg.arrays) != 1:
            raise WireError(f"an input message carries one tensor, got {len(msg.arrays)}")
        return cls(frame, geometry, content, msg.arrays[0], refined)


@dataclass(frozen=True)
class Result:
    """A scored frame: what the model said of it, output by output, with everything postprocess needs."""

    frame: FrameRef
    geometry: Geometry
    content: float
    outputs: dict[str, np.ndarray]
    refined: bool = False

    @classmethod
    def of(cls, prepared: PreparedInput, outputs: dict[str, np.ndarray]) -> Result:
        return cls(prepared.frame, prepared.geometry, prepared.content, outputs, prepared.refined)

    def message(self) -> Message:
        return Message(Kind.RESULT.value, {**self.frame.header(), "geom": self.geometry.as_wire(),
                                           "content": self.content, "refined": self.refined,
                                           "outputs": list(self.outputs)},
                       tuple(self.outputs.values()))

    @classmethod
    def from_message(cls, msg: Message) -> Result:
        frame, geometry, content, refined = _prepared_fields(msg, Kind.RESULT)
        names = _field(msg.header, "outputs", (list,), "a list")
        if not all(type(n) is str for n in names) or len(set(names)) != len(names):
            raise WireError(f"field 'outputs' must be distinct names, got {names!r}")
        if len(names) != len(msg.arrays):
            raise WireError(f"{len(names)} output names for {len(msg.arrays)} tensors")
        return cls(frame, geometry, content, dict(zip(names, msg.arrays, strict=True)), refined)


@dataclass(frozen=True)
class RefineRequest:
    """The frames postprocess wants scored next, most wanted first; each request replaces the last. It also
    says how many refined frames postprocess has scored, so preprocess knows how many are in flight."""

    frame_ids: tuple[int, ...]
    scored: int

    def message(self) -> Message:
        return Message(Kind.REFINE.value, {"ids": list(self.frame_ids), "scored": self.scored})

    @classmethod
    def from_message(cls, msg: Message) -> RefineRequest:
        if msg.kind != Kind.REFINE.value:
            raise WireError(f"expected a refine message, got {msg.kind!r}")
        ids = _field(msg.header, "ids", (list,), "a list")
        if not all(type(i) is int and i >= 0 for i in ids):
            raise WireError(f"field 'ids' must be frame ids, got {ids!r}")
        scored = _field(msg.header, "scored", (int,), "an int")
        return cls(tuple(ids), scored)


def _prepared_fields(msg: Message, kind: Kind) -> tuple[FrameRef, Geometry, float, bool]:
    if msg.kind != kind.value:
        raise WireError(f"expected a {kind.value} message, got {msg.kind!r}")
    frame = FrameRef.from_header(msg.header, kind)
    try:
        geometry = Geometry.from_wire(_field(msg.header, "geom", (dict,), "a map"))
    except ValueError as exc:
        raise WireError(str(exc)) from None
    content = _field(msg.header, "content", (float, int), "a number")
    if not 0.0 <= content <= 1.0:
        raise WireError(f"field 'content' must lie in [0, 1], got {content!r}")
    return frame, geometry, float(content), _field(msg.header, "refined", (bool,), "true or false")


HOPS: dict[Kind, Any] = {
    Kind.FRAME: lambda msg: FrameRef.from_header(msg.header, Kind.FRAME),
    Kind.INPUT: PreparedInput.from_message,
    Kind.RESULT: Result.from_message,
    Kind.REFINE: RefineRequest.from_message,
}
"""Decoder of each data link's message kind."""
