"""Shared-memory ring of full-resolution frames, so ZMQ only has to carry a (slot, seq) reference.

One writer process fills slots round-robin; readers in other processes copy (or borrow) a frame by the
(slot, seq) pair the writer returned. Each slot is guarded by a seqlock: the writer makes the slot's
sequence number odd while it writes and even again when done, and a reader checks the number before and
after touching the data, so an overwritten or half-written frame is detected instead of being returned.

Memory ordering: the sequence number is an aligned 8-byte field written and read through a numpy view, so
each access is a single load or store. On x86-64 (TSO) stores become visible in program order and loads are
not reordered with other loads, which is exactly what the seq-before / data / seq-after protocol needs.
Python offers no fences, so on weakly ordered CPUs (ARM64) this relies on the hundreds of interpreter
instructions between the accesses; there it is sound for detecting overwrites in practice, not formally.

Layout (little-endian):
    [0, 64)                 magic b"SWRING01", uint64 slot count, uint64 slot capacity in bytes,
                            uint64 "consumed before": the first reader (preprocess) is done with every
                            frame id below it; uint64 "released before": the same for the last reader
                            (postprocess, which copies best frames out of the ring)
    [64, 64 + 64 * slots)   per-slot metadata, one 64-byte line each (see _META)
    then                    slot data areas, each starting on a 64-byte boundary
"""

from __future__ import annotations

import os
import struct
import sys
from math import prod
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

_MAGIC = b"SWRING01"
_HEADER = struct.Struct("<8sQQ")
_ALIGN = 64
_META = np.dtype(
    {
        "names": ["seq", "frame_id", "ndim", "dtype", "shape", "nbytes"],
        "formats": ["<u8", "<i8", "<u4", "<u4", ("<u4", (3,)), "<u8"],
        "offsets": [0, 8, 16, 20, 24, 40],
        "itemsize": _ALIGN,
    }
)
# Frame dtype codes stored in the metadata; keyed by numpy kind + itemsize so byte order doesn't matter.
_CODES = {"u1": 1, "u2": 2, "f4": 3}
_DTYPES = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 3: np.dtype(np.float32)}


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _layout(slots: int, slot_bytes: int) -> tuple[int, int, int]:
    """Return (data offset, slot stride, total segment size)."""
    data_offset = _ALIGN + _ALIGN * slots
    stride = _align(slot_bytes)
    return data_offset, stride, data_offset + stride * slots


def _read_header(shm: SharedMemory) -> tuple[int, int]:
    if shm.size < _HEADER.size:
        raise ValueError(f"shared memory {shm.name!r} is not a frame ring (too small)")
    magic, slots, slot_bytes = _HEADER.unpack_from(shm.buf, 0)
    if magic != _MAGIC:
        raise ValueError(f"shared memory {shm.name!r} is not a frame ring (bad magic {magic!r})")
    if slots < 1 or slot_bytes < 1 or _layout(slots, slot_bytes)[2] > shm.size:
        raise ValueError(f"shared memory {shm.name!r} has a corrupt ring header")
    return slots, slot_bytes


def _no_register(name: str, rtype: str) -> None:
    pass


def _open_untracked(name: str) -> SharedMemory:
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    # Before 3.13 attaching registers the segment with the resource tracker, which would unlink the
    # owner's segment when this process exits; not thread-safe, so attach before starting threads.
    original = resource_tracker.register
    resource_tracker.register = _no_register
    try:
        return SharedMemory(name=name)
    finally:
        resource_tracker.register = original


class FrameRing:
    """Seqlock-guarded frame slots in one shared-memory segment; build with `create` or `attach`."""

    def __init__(self, shm: SharedMemory, owner: bool, slots: int, slot_bytes: int) -> None:
        self._shm = shm
        self._owner = owner
        self._unlinked = False
        self._slots = slots
        self._slot_bytes = slot_bytes
        self._next = 0
        data_offset, stride, end = _layout(slots, slot_bytes)
        # frombuffer holds a real buffer export (np.ndarray(buffer=...) does not), so closing while a view
        # is alive raises BufferError instead of unmapping memory from under it.
        whole = np.frombuffer(shm.buf, dtype=np.uint8)
        self._marks = whole[_HEADER.size:_HEADER.size + 16].view("<u8")  # [consumed, released]
        meta = whole[_ALIGN:data_offset].view(_META)
        self._seq = meta["seq"]
        self._frame_id = meta["frame_id"]
        self._ndim = meta["ndim"]
        self._dtype = meta["dtype"]
        self._shape = meta["shape"]
        self._nbytes = meta["nbytes"]
        self._data = whole[data_offset:end].reshape(slots, stride)

    @classmethod
    def create(cls, slots: int, slot_bytes: int, name: str | None = None) -> FrameRing:
        """Create and own a new ring; the resource tracker unlinks it if this process dies uncleanly."""
        for label, value in (("slots", slots), ("slot_bytes", slot_bytes)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        shm = SharedMemory(name=name, create=True, size=_layout(slots, slot_bytes)[2])
        # Magic goes in last so a concurrent attach never sees a ring with a half-written header.
        _HEADER.pack_into(shm.buf, 0, b"\0" * len(_MAGIC), slots, slot_bytes)
        shm.buf[: len(_MAGIC)] = _MAGIC
        return cls(shm, True, slots, slot_bytes)

    @classmethod
    def attach(cls, name: str) -> FrameRing:
        """Open an existing ring without taking part in its lifetime (no resource-tracker registration)."""
        try:
            shm = _open_untracked(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"no shared-memory frame ring named {name!r}") from None
        try:
            slots, slot_bytes = _read_header(shm)
        except ValueError:
            shm.close()
            raise
        return cls(shm, False, slots, slot_bytes)

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    def _check_slot(self, slot: int) -> None:
        if self._data is None:
            raise ValueError("frame ring is closed")
        if not 0 <= slot < self._slots:
            raise ValueError(f"slot {slot} out of range for a {self._slots}-slot ring")

    def write(self, frame: np.ndarray, frame_id: int) -> tuple[int, int]:
        """Copy `frame` (H, W[, C] of uint8/uint16/float32) into the next slot; return its (slot, seq)."""
        frame = np.asarray(frame)
        if frame.ndim not in (2, 3):
            raise ValueError(f"frame must be (H, W) or (H, W, C), got shape {frame.shape}")
        code = _CODES.get(f"{frame.dtype.kind}{frame.dtype.itemsize}")
        if code is None:
            raise ValueError(f"frame dtype {frame.dtype} unsupported; use uint8, uint16 or float32")
        if frame.nbytes > self._slot_bytes:
            raise ValueError(
                f"frame {frame.shape} {frame.dtype} is {frame.nbytes} bytes, "
                f"over the {self._slot_bytes}-byte slot"
            )
        if max(frame.shape) >= 1 << 32:
            raise ValueError(f"frame shape {frame.shape} does not fit the ring's uint32 dims")
        slot = self._next
        self._check_slot(slot)
        current = int(self._seq[slot])
        # A writer killed mid-write leaves the seq odd; skip ahead so "writing" is always odd.
        writing = current + 1 + (current & 1)
        self._seq[slot] = writing
        dest = self._data[slot, : frame.nbytes].view(_DTYPES[code]).reshape(frame.shape)
        np.copyto(dest, frame)
        self._frame_id[slot] = frame_id
        self._ndim[slot] = frame.ndim
        self._dtype[slot] = code
        self._shape[slot] = (*frame.shape, 0)[:3]
        self._nbytes[slot] = frame.nbytes
        self._seq[slot] = writing + 1
        self._next = (slot + 1) % self._slots
        return slot, writing + 1

    @property
    def next_slot(self) -> int:
        """The slot the next `write` fills."""
        return self._next

    @property
    def consumed_before(self) -> int:
        """Every frame id below this one has been dealt with by the first reader (used, skipped, dropped)."""
        return int(self._marks[0])

    def mark_consumed(self, frame_id: int) -> None:
        """First reader: frames arrive in id order, so being done with `frame_id` means being done with all
        before it. A writer that must not run ahead of the pipeline waits on this."""
        self._marks[0] = frame_id + 1

    @property
    def released_before(self) -> int:
        """No reader will look at a frame id below this one again; its slot may be reused without loss."""
        return int(self._marks[1])

    def mark_released(self, frame_id: int) -> None:
        """Last reader: done with `frame_id` and every frame before it."""
        self._marks[1] = frame_id + 1

    def shortfall(self, frame_bytes: int, shm_dir: str = "/dev/shm") -> int:
        """Bytes the shared-memory file system lacks for every slot to hold a frame of `frame_bytes`
        (its pages are only taken as slots are first written, so a ring too big for it fails with SIGBUS
        long after it was made). 0 when it fits, or where the file system cannot be asked."""
        try:
            stats = os.statvfs(shm_dir)
            taken = os.stat(os.path.join(shm_dir, self.name.lstrip("/"))).st_blocks * 512
        except OSError:
            return 0
        needed = self._slots * min(_align(frame_bytes), self._slot_bytes) - taken
        return max(0, needed - stats.f_bavail * stats.f_frsize)

    def prefault(self, frame_bytes: int) -> None:
        """Writer: touch every slot's first `frame_bytes` once, so that no frame later pays for the kernel
        allocating its slot's pages on first write (6 MB a 1080p colour frame: about 5 ms of page faults,
        which put the first lap of the ring into the capture stage's p90)."""
        used = min(_align(frame_bytes), self._slot_bytes)
        for slot in range(self._slots):
            if int(self._seq[slot]) == 0:
                self._data[slot, :used] = 0

    def resume(self) -> int:
        """For a writer that replaces one that died: continue after the newest frame in the ring (its slot
        and id); returns the next frame id (0 for an empty ring)."""
        self._check_slot(0)
        written = np.flatnonzero(self._seq > 0)
        if not written.size:
            return 0
        newest = int(written[np.argmax(self._frame_id[written])])
        self._next = (newest + 1) % self._slots
        return int(self._frame_id[newest]) + 1

    def find(self, frame_id: int) -> tuple[int, int] | None:
        """(slot, seq) of the frame with this id while a slot still holds it, else None: a reader that
        never got the frame's reference (a frame chosen for refinement after it was skipped) finds it so."""
        if self._data is None:
            raise ValueError("frame ring is closed")
        for slot in np.flatnonzero(self._frame_id == frame_id):
            seq = int(self._seq[slot])
            if seq > 0 and seq % 2 == 0 and int(self._frame_id[slot]) == frame_id:
                return int(slot), seq
        return None

    def valid(self, slot: int, seq: int) -> bool:
        """True while the slot still holds exactly the write identified by (slot, seq)."""
        self._check_slot(slot)
        return seq > 0 and seq % 2 == 0 and int(self._seq[slot]) == seq

    def _view(self, slot: int, seq: int) -> np.ndarray | None:
        if not self.valid(slot, seq):
            return None
        ndim, code, nbytes = int(self._ndim[slot]), int(self._dtype[slot]), int(self._nbytes[slot])
        dtype = _DTYPES.get(code)
        if ndim not in (2, 3) or dtype is None or nbytes > self._slot_bytes:
            return None  # metadata torn by a write that began after the seq check
        shape = tuple(int(n) for n in self._shape[slot, :ndim])
        if prod(shape) * dtype.itemsize != nbytes:
            return None
        return self._data[slot, :nbytes].view(dtype).reshape(shape)

    def read(self, slot: int, seq: int) -> np.ndarray | None:
        """Return a private copy of the frame, or None if it was overwritten before or during the copy."""
        view = self._view(slot, seq)
        if view is None:
            return None
        frame = view.copy()
        return frame if int(self._seq[slot]) == seq else None

    def borrow(self, slot: int, seq: int) -> np.ndarray | None:
        """Return a zero-copy read-only view of the frame, or None if it is no longer there.

        The writer may overwrite the slot at any time: after using the view, call `valid(slot, seq)` and
        discard everything computed from it if that returns False. Drop the view before `close()`.
        """
        view = self._view(slot, seq)
        if view is not None:
            view.flags.writeable = False
        return view

    def close(self) -> None:
        """Unmap the segment; idempotent. Views from `borrow` must already be gone."""
        self._seq = self._frame_id = self._ndim = self._dtype = self._shape = self._nbytes = None
        self._marks = None
        self._data = None
        try:
            self._shm.close()
        except BufferError as exc:
            raise BufferError(f"ring {self.name!r} still has borrowed views alive: {exc}") from exc

    def unlink(self) -> None:
        """Remove the segment name (owner only); processes that have it mapped keep their mapping."""
        if not self._owner:
            raise RuntimeError("only the process that created the ring may unlink it")
        if not self._unlinked:
            self._shm.unlink()
            self._unlinked = True

    def __enter__(self) -> FrameRing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close, and unlink too when this handle created the ring."""
        self.close()
        if self._owner:
            self.unlink()

    def __del__(self) -> None:
        # Drop our views before SharedMemory.__del__ runs, or it fails with BufferError on exit.
        self.close()
