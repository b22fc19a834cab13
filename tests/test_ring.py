from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.ring import FrameRing

ROOT = Path(__file__).resolve().parents[1]
DEV_SHM = Path("/dev/shm")
needs_dev_shm = pytest.mark.skipif(not DEV_SHM.is_dir(), reason="needs POSIX shared memory in /dev/shm")


@pytest.fixture
def ring():
    with FrameRing.create(slots=3, slot_bytes=64 * 48 * 3 * 4) as r:
        yield r


def test_round_trip_gray_and_color(ring: FrameRing) -> None:
    rng = np.random.default_rng(0)
    frames = [
        rng.integers(0, 256, (48, 64), dtype=np.uint8),
        rng.integers(0, 65536, (48, 64), dtype=np.uint16),
        rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
        rng.random((48, 64, 3), dtype=np.float32),
        np.arange(48 * 64, dtype=">u2").reshape(48, 64),  # byte order is normalised
        rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)[::2, ::-1],  # non-contiguous
    ]
    for frame_id, frame in enumerate(frames):
        slot, seq = ring.write(frame, frame_id)
        assert seq % 2 == 0 and ring.valid(slot, seq)
        got = ring.read(slot, seq)
        assert got is not None and got.shape == frame.shape and got.dtype == frame.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got, frame)
        got[...] = 0  # a copy: scribbling on it leaves the slot alone
        view = ring.borrow(slot, seq)
        assert view is not None and not view.flags.writeable
        np.testing.assert_array_equal(view, frame)
        del view


def test_reader_in_same_process_sees_writes(ring: FrameRing) -> None:
    with FrameRing.attach(ring.name) as reader:
        assert (reader.slots, reader.slot_bytes) == (ring.slots, ring.slot_bytes)
        slot, seq = ring.write(np.full((4, 5), 9, np.uint8), 1)
        np.testing.assert_array_equal(reader.read(slot, seq), np.full((4, 5), 9, np.uint8))
    assert Path(DEV_SHM, ring.name).exists() or not DEV_SHM.is_dir()


def test_overwritten_slot_reads_none(ring: FrameRing) -> None:
    refs = [ring.write(np.full((8, 8), i, np.uint8), i) for i in range(ring.slots + 1)]
    first = refs[0]
    assert refs[-1][0] == first[0] and refs[-1][1] > first[1]
    assert ring.read(*first) is None
    assert ring.borrow(*first) is None
    assert not ring.valid(*first)
    for i, ref in enumerate(refs[1:], start=1):
        np.testing.assert_array_equal(ring.read(*ref), np.full((8, 8), i, np.uint8))


def test_unwritten_and_odd_seqs_are_invalid(ring: FrameRing) -> None:
    assert ring.read(0, 0) is None
    slot, seq = ring.write(np.zeros((2, 2), np.uint8), 0)
    assert ring.read(slot, seq - 1) is None
    with pytest.raises(ValueError, match="out of range"):
        ring.read(ring.slots, 2)


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (np.zeros((1000, 1000), np.uint8), "over the"),
        (np.zeros(16, np.uint8), "shape"),
        (np.zeros((2, 2, 2, 2), np.uint8), "shape"),
        (np.zeros((4, 4), np.int32), "dtype int32 unsupported"),
        (np.zeros((4, 4), np.float64), "dtype float64 unsupported"),
    ],
)
def test_write_rejects_bad_frames(ring: FrameRing, frame: np.ndarray, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ring.write(frame, 0)


@pytest.mark.parametrize(("slots", "slot_bytes"), [(0, 10), (2, 0), (-1, 10), (2, 1.5), (True, 10)])
def test_create_rejects_bad_sizes(slots, slot_bytes) -> None:
    with pytest.raises(ValueError):
        FrameRing.create(slots, slot_bytes)


def test_attach_missing_name_is_clear() -> None:
    with pytest.raises(FileNotFoundError, match="no shared-memory frame ring named 'swr_missing_x'"):
        FrameRing.attach("swr_missing_x")


def test_attach_non_ring_is_clear() -> None:
    from multiprocessing.shared_memory import SharedMemory

    shm = SharedMemory(create=True, size=4096)
    try:
        with pytest.raises(ValueError, match="not a frame ring"):
            FrameRing.attach(shm.name)
    finally:
        shm.close()
        shm.unlink()


def test_close_is_idempotent_and_refuses_live_borrows() -> None:
    ring = FrameRing.create(2, 64)
    try:
        view = ring.borrow(*ring.write(np.ones((8, 8), np.uint8), 0))
        with pytest.raises(BufferError, match="borrowed views"):
            ring.close()
        del view
        ring.close()
        ring.close()
        with pytest.raises(ValueError, match="closed"):
            ring.write(np.ones((8, 8), np.uint8), 1)
    finally:
        ring.unlink()
        ring.unlink()


def test_non_owner_cannot_unlink(ring: FrameRing) -> None:
    with FrameRing.attach(ring.name) as reader, pytest.raises(RuntimeError, match="created"):
        reader.unlink()


# ---- cross-process tests ---------------------------------------------------------------------------

FRAME_SHAPE = (512, 1024)  # 512 KiB: long enough copies that readers and the writer really overlap
N_FRAMES = 1500


def write_uniform_frames(name: str, refs: mp.Queue) -> None:
    """Spawned writer: every byte of frame i is i % 256, so a torn frame cannot be uniform."""
    frames = [np.full(FRAME_SHAPE, value, np.uint8) for value in range(256)]
    with FrameRing.attach(name) as ring:
        for frame_id in range(N_FRAMES):
            refs.put((*ring.write(frames[frame_id % 256], frame_id), frame_id))
            if frame_id % 8 == 0:
                time.sleep(0.001)  # let the reader catch up now and then so some reads succeed
    refs.put(None)


def test_concurrent_reads_are_never_torn() -> None:
    ctx = mp.get_context("spawn")
    refs = ctx.Queue()
    with FrameRing.create(slots=2, slot_bytes=FRAME_SHAPE[0] * FRAME_SHAPE[1]) as ring:
        writer = ctx.Process(target=write_uniform_frames, args=(ring.name, refs))
        writer.start()
        good = stale = 0
        try:
            while (ref := refs.get(timeout=20)) is not None:
                slot, seq, frame_id = ref
                if frame_id % 2:
                    frame = ring.read(slot, seq)
                    intact = frame is not None
                    assert not intact or frame.min() == frame.max() == frame_id % 256, f"torn {frame_id}"
                else:
                    view = ring.borrow(slot, seq)
                    uniform = view is not None and view.min() == view.max() == frame_id % 256
                    del view
                    intact = ring.valid(slot, seq)  # results from a borrowed view count only if still valid
                    assert not intact or uniform, f"torn borrowed frame {frame_id}"
                good += intact
                stale += not intact
        finally:
            writer.join(timeout=20)
        assert writer.exitcode == 0
    assert good > 0, "no frame was ever read intact"
    assert stale > 0, "no overwrite was ever detected"


def start_python(code: str) -> subprocess.Popen:
    """A fresh interpreter, so it gets its own resource tracker as an unrelated process would."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


@needs_dev_shm
@pytest.mark.parametrize("ending", ["sigkill", "clean_exit"])
def test_attached_reader_ending_leaves_segment(ending: str) -> None:
    ring = FrameRing.create(2, 4096)
    try:
        ref = ring.write(np.full((64, 64), 5, np.uint8), 0)
        reader = start_python(
            "import sys, time\n"
            "from pipeline.ring import FrameRing\n"
            f"ring = FrameRing.attach({ring.name!r})\n"
            f"assert ring.read(*{ref!r})[0, 0] == 5\n"
            "print('ready', flush=True)\n"
            f"time.sleep(30 if {ending == 'sigkill'} else 0)\n"
            "ring.close()\n"
        )
        assert reader.stdout.readline().strip() == "ready"
        if ending == "sigkill":
            os.kill(reader.pid, signal.SIGKILL)
        reader.wait(timeout=10)
        reader.stdout.close()
        time.sleep(0.3)  # give a (wrongly) registered tracker time to unlink
        assert (DEV_SHM / ring.name).exists()
        np.testing.assert_array_equal(ring.read(*ref), np.full((64, 64), 5, np.uint8))
        slot, seq = ring.write(np.full((64, 64), 6, np.uint8), 1)
        assert ring.read(slot, seq)[0, 0] == 6
    finally:
        ring.close()
        ring.unlink()
    assert not (DEV_SHM / ring.name).exists()


@needs_dev_shm
def test_killed_owner_segment_is_reclaimed() -> None:
    owner = start_python(
        "import time\n"
        "from pipeline.ring import FrameRing\n"
        "ring = FrameRing.create(2, 4096)\n"
        "print(ring.name, flush=True)\n"
        "time.sleep(30)\n"
    )
    name = owner.stdout.readline().strip()
    owner.stdout.close()
    assert name and (DEV_SHM / name).exists()
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait(timeout=10)
    deadline = time.monotonic() + 5
    while (DEV_SHM / name).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (DEV_SHM / name).exists(), "resource tracker did not unlink the dead owner's segment"


def test_reader_publishes_how_far_it_has_consumed() -> None:
    with FrameRing.create(slots=4, slot_bytes=64) as ring:
        reader = FrameRing.attach(ring.name)
        assert ring.consumed_before == 0 and ring.next_slot == 0
        for i in range(3):
            ring.write(np.full((8, 8), i, np.uint8), i)
        assert ring.next_slot == 3
        reader.mark_consumed(1)
        assert ring.consumed_before == reader.consumed_before == 2
        assert ring.released_before == 0  # the two marks are separate counters
        last = FrameRing.attach(ring.name)
        last.mark_released(0)
        assert ring.released_before == reader.released_before == 1 and ring.consumed_before == 2
        last.close()
        reader.close()


def test_a_ring_too_big_for_shared_memory_is_told_before_it_fails() -> None:
    """Slots take pages only as they are written, so the shortfall is measured against the frames to come:
    64 GiB of slots does not fit any CI machine's /dev/shm, 1024 small frames do."""
    ring = FrameRing.create(1024, 64 * 2**20)
    try:
        assert ring.shortfall(64 * 2**20) > 0
        assert ring.shortfall(100_000) == 0
    finally:
        ring.close()
        ring.unlink()
