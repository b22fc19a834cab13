"""Capture: source -> shared-memory ring, plus one small header per frame downstream."""

from __future__ import annotations

import logging
import time
from collections import deque

from .graph import FLOOD_IN_FLIGHT
from .messages import FrameRef
from .ring import FrameRing
from .sources import Source, SourceFrame, open_source
from .stage import Stage

log = logging.getLogger("sweepstream")

# Longest wait for preprocess to free a ring slot before overwriting it anyway (then counted as a drop);
# short enough that the capture loop keeps reporting to the supervisor.
SLOT_WAIT_S = 1.0
READ_WINDOW = 30  # recent read times a paced source's read-ahead is sized on (a second at 30 fps)
READ_MARGIN_S = 0.002


class Pacer:
    """Releases recorded frames at their presentation times. When it falls behind (slow decode) it does not
    burst to catch up: a late frame re-anchors the schedule, as a live source would behave.

    It also reads each frame just before it is due (by the longest recent read plus a margin), as a live
    source delivers a frame when it is captured: read straight after the previous release, a decode or a
    phantom render competes for a core with the previous frame still in the pipeline (on 2 cores with the
    demo that put the capture>preprocess p99 at about 5 ms, against about 1.3 ms read just in time).
    """

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self._due: float | None = None
        self._step = self.period  # the last interval between releases: the expected next one
        self._last_pts: float | None = None
        self._read_s: deque[float] = deque(maxlen=READ_WINDOW)

    def read(self, source: Source) -> SourceFrame | None:
        if self._due is None:
            return source.read()  # the first read also opens decoders and builds tables: not a sample
        if self._read_s:
            lead = max(self._read_s) + READ_MARGIN_S
            delay = self._due + self._step - lead - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        started = time.monotonic()
        frame = source.read()
        self._read_s.append(time.monotonic() - started)
        return frame

    def wait(self, pts: float | None) -> None:
        now = time.monotonic()
        if self._due is None:
            self._due = now
        else:
            step = self.period
            if pts is not None and self._last_pts is not None and 0 < pts - self._last_pts < 1.0:
                step = pts - self._last_pts
            self._due += step
            self._step = step
            if self._due > now:
                time.sleep(self._due - now)
            elif now - self._due > self.period:
                self._due = now
        self._last_pts = pts


class CaptureStage(Stage):
    """Reads the source, writes each frame into the ring and sends a `FrameRef` on its `frames` link."""

    stamp_out = "cap_out"

    def start(self) -> None:
        cfg = self.config.source
        self.source: Source = open_source(cfg.uri, cfg.pixel_format, self.config.preprocess.roi)
        self.ring = FrameRing.attach(self.wiring.ring)
        self.out = self.open("frames")
        self.pacer = None if (cfg.flood or self.source.live) else Pacer(self.source.fps)
        self._next_id = 0
        self._running = False
        self._in_flight: dict[int, int] = {}  # ring slot -> id of the frame sent from it
        if self.life:
            self._resume()

    def _resume(self) -> None:
        """A restarted capture: frame ids go on after the newest frame in the ring, and a recording goes on
        from the frame after it (Source.seek; a live source simply delivers its newest)."""
        self._next_id = self.ring.resume()
        if self.source.live:
            return
        self.source.seek(self._next_id, self.config.source.loop)
        log.info("capture: restarted; going on from frame %d", self._next_id)

    def go(self) -> None:
        self._running = True
        self._started = time.monotonic()
        self.poll_ms = 0  # produce continuously; control is still polled between frames

    def step(self, ready: bool) -> None:
        if not self._running:
            return
        if self._limit_reached():
            self.drain()
            return
        if self._lossless or self.config.source.flood:
            self._wait_for_reader()  # before reading, so a flooded frame's latency starts when it is read
        frame = self.pacer.read(self.source) if self.pacer is not None else self.source.read()
        for name, count in self.source.health().items():  # the source's own running totals
            self.counters[name] = count
        if frame is None and not self.source.ended:
            return  # a live source with no new frame yet (or reconnecting): poll control, try again
        if frame is None and self.config.source.loop:
            self.source.rewind()
            frame = self.source.read()
        if frame is None:
            self.drain()
            return
        if self.pacer is not None:
            self.pacer.wait(frame.pts)
        self._publish(frame, frame.t_arrival or time.monotonic_ns())

    def _limit_reached(self) -> bool:
        cfg = self.config.source
        return (cfg.max_frames is not None and self._next_id >= cfg.max_frames) or (
            cfg.duration is not None and time.monotonic() - self._started >= cfg.duration)

    def _publish(self, frame: SourceFrame, t_capture: int) -> None:
        if self._next_id == 0 and (lacking := self.ring.shortfall(frame.image.nbytes)):
            size = frame.image.nbytes / 2**20
            raise ValueError(f"source {self.source.uri}: {self.ring.slots} ring slots of {size:.1f} MiB "
                             f"frames need {lacking / 2**20:.0f} MiB more shared memory (/dev/shm) than is "
                             "free: lower ring.slots or enlarge /dev/shm")
        if self._next_id == 0:
            self.ring.prefault(frame.image.nbytes)
        frame_id, self._next_id = self._next_id, self._next_id + 1
        self.counters["read"] += 1
        try:
            slot, seq = self.ring.write(frame.image, frame_id)
        except ValueError as exc:
            raise ValueError(f"source {self.source.uri}: frame {frame.index}: {exc} "
                             f"(raise ring.slot_mb)") from None
        ref = FrameRef(frame_id, slot, seq, frame.image.shape,
                       {"index": frame.index, "pts": frame.pts, **frame.meta}, {"cap": t_capture})
        if self.push(self.out, ref, wait=self.config.source.flood):
            self._in_flight[slot] = frame_id
        else:
            self._in_flight.pop(slot, None)

    def _wait_for_reader(self) -> None:
        """Lossless runs must not overwrite a frame the pipeline has not finished with: preprocess reads it
        and postprocess may copy it out as a best frame (ZeroMQ's high-water mark cannot promise that:
        small headers also queue in kernel socket buffers). A flooded recording has no camera to keep up
        with, so it also keeps at most FLOOD_IN_FLIGHT frames ahead of preprocess: as fast as the pipeline
        goes, without producing frames only to drop them."""
        pending = self._in_flight.get(self.ring.next_slot)
        ahead = FLOOD_IN_FLIGHT if self.config.source.flood else self.ring.slots
        deadline = time.monotonic() + SLOT_WAIT_S
        while time.monotonic() < deadline:
            reusable = pending is None or pending < self.ring.released_before
            if reusable and self._next_id - self.ring.consumed_before < ahead:
                return
            time.sleep(0.0002)

    def drain(self) -> None:
        if not self.finished:
            self.send_eos(self.out)
            self.finished = True
            log.info("capture: end of stream after %d frames", self.counters["read"])

    def describe(self) -> dict:
        return {"source": self.source.describe()}

    def stop(self) -> None:
        if getattr(self, "source", None) is not None:
            self.source.close()
        if getattr(self, "ring", None) is not None:
            self.ring.close()
