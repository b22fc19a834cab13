"""Shared fixtures: real files written with the real libraries, the pipeline run as a real command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.events import read_journal as read_events

REPO = Path(__file__).resolve().parents[1]


def write_mp4(path: Path, frames: int, width: int = 320, height: int = 240, fps: int = 30) -> Path:
    """An H.264 MP4 whose frame i has a bright bar at a position that encodes i."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 30, dtype=np.uint8)
            x = (i * 7) % (width - 20)
            image[:, x:x + 20] = 220
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def mp4_60(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mp4(tmp_path_factory.mktemp("video") / "sweep.mp4", 60)


def run_stream_cmd(*args: str) -> list[str]:
    """Plumbing tests run the reference bundle unless they name one; tests of the demo name none."""
    bundle = [] if "--bundle" in args else ["--bundle", str(REPO / "bundles" / "reference")]
    return [sys.executable, str(REPO / "run_stream.py"), "--events", "tcp://127.0.0.1:*",
            "--control", "tcp://127.0.0.1:*", *bundle, *args]


def run_pipeline(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(run_stream_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def read_journal(out: Path, kind: str | None = None) -> list[dict]:
    """The run's events, or only those of one type."""
    events = read_events(out / "events.jsonl")
    return events if kind is None else [e for e in events if e["type"] == kind]


def shm_segments() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def socket_dirs() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("sweepstream-*")}


def children_of(pid: int) -> set[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stage_pids(supervisor: int) -> dict[str, int]:
    """The supervisor's stage processes by name, found through the titles they give themselves."""
    found = {}
    for pid in children_of(supervisor):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if title.startswith("sweepstream: "):
            found[title.removeprefix("sweepstream: ")] = pid
    return found


def all_gone(pids: set[int], within: float = 1.0) -> bool:
    """True once none of `pids` is alive (helpers such as the resource tracker exit just after us)."""
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
