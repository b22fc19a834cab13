"""Preprocess: full-resolution frame in the ring -> model input (ROI, pad to square, resize, channels)."""

from __future__ import annotations

import logging
import time
from collections import deque

import cv2
import numpy as np
import zmq

from . import wire
from .capture import FLOOD_IN_FLIGHT
from .ring import FrameRing
from .stage import Stage
from .wire import Message

log = logging.getLogger("sweepstream")

INTERPOLATION = {"area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR,
                 "nearest": cv2.INTER_NEAREST}
# The manifest's `input.resize` in this module's terms (the final step after a whole-factor box filter).
BUNDLE_RESIZE = {"bicubic": "cubic", "bilinear": "linear", "area": "area", "nearest": "nearest"}


def letterbox(frame: np.ndarray, size: int, channels: int, *, pad_to_square: bool = True,
              roi: tuple[int, int, int, int] | None = None, interpolation: str = "area"
              ) -> tuple[np.ndarray, dict]:
    """Model input of `size` x `size` (x channels) and the geometry that maps it back to the frame.

    Padding to square is done by resizing the content into its place on a zero canvas, which equals
    padding first and resizing after, without ever building the padded full-resolution image. A model
    pixel (u, v) comes from frame pixel (roi_x + (u - offset_x) / scale_x, roi_y + (v - offset_y) / scale_y).
    """
    x0, y0 = 0, 0
    if roi is not None:
        x0, y0, w, h = roi
        frame = frame[y0:y0 + h, x0:x0 + w]
    height, width = frame.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"empty frame after ROI {roi}")
    if pad_to_square:
        fit = size / max(height, width)
        new_w, new_h = max(1, round(width * fit)), max(1, round(height * fit))
    else:
        new_w, new_h = size, size
    if frame.ndim == 3 and channels == 1:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)  # before resizing: a third of the pixels to filter
    factor = min(width // new_w, height // new_h)
    if factor >= 2:
        frame, (x0, y0, width, height) = _shrink_whole(frame, factor, (x0, y0, width, height))
    resized = cv2.resize(frame, (new_w, new_h), interpolation=INTERPOLATION[interpolation])
    if resized.ndim == 2 and channels == 3:
        resized = cv2.cvtColor(resized, cv2.COLOR_GRAY2BGR)
    shape = (size, size) if channels == 1 else (size, size, channels)
    out = np.zeros(shape, dtype=np.uint8)
    off_x, off_y = (size - new_w) // 2, (size - new_h) // 2
    out[off_y:off_y + new_h, off_x:off_x + new_w] = resized
    geometry = {"roi": [x0, y0, width, height], "offset": [off_x, off_y], "content": [new_w, new_h],
                "scale": [new_w / width, new_h / height]}
    return out, geometry


def _shrink_whole(frame: np.ndarray, factor: int, box: tuple[int, int, int, int]
                  ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Box-filter by a whole factor first: OpenCV's area filter is several times faster for an exact
    integer ratio, so the frame loses its last < `factor` rows and columns (split evenly between both
    sides, reflected in the returned box) and the remaining < 2x step is cheap."""
    x0, y0, width, height = box
    used_w, used_h = width // factor * factor, height // factor * factor
    cut_x, cut_y = (width - used_w) // 2, (height - used_h) // 2
    frame = frame[cut_y:cut_y + used_h, cut_x:cut_x + used_w]
    small = cv2.resize(frame, (used_w // factor, used_h // factor), interpolation=cv2.INTER_AREA)
    return small, (x0 + cut_x, y0 + cut_y, used_w, used_h)


class PreprocessStage(Stage):
    """Prepares every frame it takes and holds the newest `infer.max_batch` of them until an infer worker
    asks for work. Infer pulls, so no prepared frame ever waits in a socket queue behind newer ones: under
    overload latency stays about one inference plus one frame period, and N workers share the load."""

    name = "preprocess"
    stamp_in = "pre_in"
    stamp_out = "pre_out"
    needs = ("slot", "seq")

    def start(self) -> None:
        self.spec = self.bundle.input
        cfg = self.config.preprocess
        self.interpolation = cfg.interpolation or BUNDLE_RESIZE[self.spec.resize]
        self.ring = FrameRing.attach(self.endpoints.ring)
        self.frames = self.socket(zmq.PULL, self.endpoints.frames, bind=False)
        self.hold = self.config.infer.max_batch
        # Workers ask for at most one batch, which bounds this queue; the mark only has to fit it.
        self.workers = self.socket(zmq.ROUTER, self.endpoints.inputs, bind=True,
                                   hwm=max(self.config.transport.hwm, self.hold + 1))
        # A ROUTER silently drops what a full peer cannot take unless told otherwise.
        self.workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.held: deque[Message] = deque()
        self.wanted: dict[bytes, int] = {}  # worker -> frames it asked for
        self.known: set[bytes] = set()
        self.end_of_stream = False

    def step(self, ready: bool) -> None:
        self._hear_workers()
        if not self.end_of_stream and (not self._lossless or len(self.held) < self.hold):
            # A live source's older frames are stale once a newer one waits; a flooded one is held back by
            # capture to FLOOD_IN_FLIGHT frames, all of which are wanted.
            keep = FLOOD_IN_FLIGHT if self.config.source.flood else 1
            frames, self.end_of_stream = self.take(self.frames, keep=min(keep, self.hold))
            for msg in frames:
                self._prepare(msg)
            if frames:
                self.ring.mark_consumed(frames[-1].header["id"])
        self._dispatch()
        if self.end_of_stream and not self.held:
            for worker in self.known:
                self.send_eos(self.workers, to=worker)
            self.finished = True

    def _hear_workers(self) -> None:
        while True:
            try:
                routed = wire.recv_routed(self.workers)
            except wire.WireError as exc:
                self.reject(f"a malformed request: {exc}")
                continue
            if routed is None:
                return
            worker, msg = routed
            count = msg.header.get("n")
            if msg.kind != "want" or type(count) is not int or count < 1:
                self.reject(f"a {msg.kind!r} request without a positive count")
                continue
            self.known.add(worker)
            self.wanted[worker] = count

    def _dispatch(self) -> None:
        while self.held and self.wanted:
            worker, count = self.wanted.popitem()
            try:
                for _ in range(min(count, len(self.held))):
                    self.push(self.workers, self.held.popleft(), wait=True, to=worker, stamp=False)
            except zmq.ZMQError as exc:  # the worker is gone (EHOSTUNREACH); its frame is lost with it
                self.known.discard(worker)
                self.counters["drop_send_full"] += 1
                log.warning("preprocess: infer worker %r is gone: %s", worker, exc)

    def _prepare(self, msg: Message) -> None:
        slot, seq = msg.header["slot"], msg.header["seq"]
        view = self.ring.borrow(slot, seq) if isinstance(slot, int) and 0 <= slot < self.ring.slots else None
        if view is not None:
            spec, roi = self.spec, self.config.preprocess.roi
            model_input, geometry = letterbox(view, spec.size, spec.channels, roi=roi,
                                              pad_to_square=spec.pad_to_square,
                                              interpolation=self.interpolation)
            del view
            if self.ring.valid(slot, seq):
                msg.header["geom"] = geometry
                msg.header["t"][self.stamp_out] = time.monotonic_ns()  # waiting for a worker is transport
                if len(self.held) == self.hold:
                    self.held.popleft()
                    self.counters["drop_held"] += 1
                self.held.append(Message("input", msg.header, (model_input,)))
                return
        self.counters["drop_overwritten"] += 1

    def stop(self) -> None:
        if getattr(self, "ring", None) is not None:
            self.held.clear()
            self.ring.close()
