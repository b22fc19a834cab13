"""`tools/bench_capture.py`: a live stream's capture figures, on a real encoder. An ffmpeg process streams its
test pattern (H.264 in MPEG-TS over UDP on loopback, paced in real time); the stream source reads it through
its newest-frame reader and every frame is written into a real shared-memory frame ring, as the capture
stage does. Then the encoder is killed and started again, several times.

Prints: capture latency from a frame's arrival (decoded, on the reader thread) to its ring write, p50 /
p99 / max; frames the reader replaced before they were taken; and per restart, the reconnect time from the
encoder's restart to the first frame written again (ffmpeg's start, the stream's probe and its first
keyframe included), and the outage from the loss being noticed to that frame.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .ring import FrameRing
from .sources import open_source

RING_SLOTS = 8


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EncoderStream:
    """A real encoder: ffmpeg's moving test pattern as H.264 (zero-latency tuning) in MPEG-TS over UDP."""

    def __init__(self, port: int, size: str = "320x240", fps: int = 30) -> None:
        self.url = f"udp://127.0.0.1:{port}"
        self.command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                        f"testsrc2=size={size}:rate={fps}", "-c:v", "libx264", "-preset", "ultrafast",
                        "-tune", "zerolatency", "-g", str(fps // 2), "-f", "mpegts",
                        f"{self.url}?pkt_size=1316"]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def percentiles(values_ms: list[float]) -> dict[str, float | int]:
    data = np.array(values_ms) if values_ms else np.zeros(1)
    return {"count": len(values_ms), "p50": round(float(np.percentile(data, 50)), 3),
            "p99": round(float(np.percentile(data, 99)), 3), "max": round(float(data.max()), 3)}


class Bench:
    """The capture stage's work on a live stream: read the newest frame, write it into the ring."""

    def __init__(self, stream: EncoderStream) -> None:
        self.stream = stream
        self.source = open_source(stream.url, "gray", None)
        self.ring: FrameRing | None = None
        self.latency_ms: list[float] = []
        self.frame_id = 0

    def pump(self, until: float) -> int | None:
        """Read and write frames into the ring until `until` (monotonic s); the arrival of the first."""
        first = None
        while time.monotonic() < until:
            frame = self.source.read()
            if frame is None:
                continue
            if self.ring is None:
                self.ring = FrameRing.create(RING_SLOTS, frame.image.nbytes)
            self.ring.write(frame.image, self.frame_id)
            written = time.monotonic_ns()
            self.frame_id += 1
            self.latency_ms.append((written - frame.t_arrival) / 1e6)
            first = frame.t_arrival if first is None else first
            if until == float("inf"):
                return first
        return first

    def restart(self, down_s: float) -> dict[str, float]:
        self.stream.kill()
        while not self.source.reader.reconnecting:
            self.pump(time.monotonic() + 0.05)
        noticed = time.monotonic_ns()
        self.pump(time.monotonic() + down_s)
        restarted = time.monotonic_ns()
        self.stream.start()
        first = self.pump(float("inf"))
        return {"reconnect_s": round((first - restarted) / 1e9, 3),
                "outage_s": round((first - noticed) / 1e9, 3)}

    def close(self) -> None:
        self.source.close()
        if self.ring is not None:
            self.ring.close()
            self.ring.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1920x1080", help="stream size (default 1080p)")
    parser.add_argument("--fps", type=int, default=30, help="stream rate")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady streaming measured for latency")
    parser.add_argument("--restarts", type=int, default=3, help="encoder kills and restarts")
    parser.add_argument("--down", type=float, default=1.0, help="seconds the encoder stays down")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        print("bench_capture: needs the ffmpeg command (apt-get install ffmpeg)", file=sys.stderr)
        return 1
    stream = EncoderStream(free_udp_port(), args.size, args.fps)
    stream.start()
    try:
        bench = Bench(stream)
        try:
            bench.pump(time.monotonic() + args.seconds)
            steady = percentiles(bench.latency_ms)
            overwritten = bench.source.health()["source_overwritten"]
            restarts = [bench.restart(args.down)
                        for _ in tqdm(range(args.restarts), desc="restarts", leave=False)]
        finally:
            bench.close()
    finally:
        stream.kill()
    print(f"{args.size} at {args.fps} fps over UDP MPEG-TS (H.264): {steady['count']} frames in "
          f"{args.seconds:g} s")
    print(f"capture latency arrival -> ring (ms): p50 {steady['p50']}  p99 {steady['p99']}  "
          f"max {steady['max']}")
    print(f"frames replaced by newer ones before capture took them: {overwritten}")
    for i, restart in enumerate(restarts, 1):
        print(f"restart {i}: reconnect {restart['reconnect_s']} s after the encoder restarted "
              f"(outage {restart['outage_s']} s from the loss being noticed)")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "fps": args.fps, "latency_ms": steady,
                                         "overwritten": overwritten, "restarts": restarts}, indent=2))
    return 0
