"""Preprocess: full-resolution frame in the ring -> model input (ROI, pad to square, resize, channels)."""

from __future__ import annotations

import cv2
import numpy as np
import zmq

from engines.base import InputSpec, load_bundle

from .capture import FLOOD_IN_FLIGHT
from .ring import FrameRing
from .stage import Stage
from .wire import Message

INTERPOLATION = {"area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR}


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
    name = "preprocess"
    stamp_in = "pre_in"
    stamp_out = "pre_out"

    def start(self) -> None:
        self.spec: InputSpec = load_bundle(self.config.infer.bundle).input
        self.ring = FrameRing.attach(self.endpoints.ring)
        self.frames = self.socket(zmq.PULL, self.endpoints.frames, bind=False)
        self.out = self.socket(zmq.PUSH, self.endpoints.inputs, bind=True)

    def step(self, ready: bool) -> None:
        if not ready:
            return
        # A live source's older frames are stale once a newer one waits; a flooded one is held back by
        # capture to FLOOD_IN_FLIGHT frames, all of which are wanted.
        frames, end = self.take(self.frames, keep=FLOOD_IN_FLIGHT if self.config.source.flood else 1)
        for msg in frames:
            self._prepare(msg)
        if frames:
            self.ring.mark_consumed(frames[-1].header["id"])
        if end:
            self.send_eos(self.out)

    def _prepare(self, msg: Message) -> None:
        slot, seq = msg.header["slot"], msg.header["seq"]
        view = self.ring.borrow(slot, seq)
        if view is not None:
            cfg = self.config.preprocess
            model_input, geometry = letterbox(view, self.spec.size, self.spec.channels,
                                              pad_to_square=self.spec.pad_to_square, roi=cfg.roi,
                                              interpolation=cfg.interpolation)
            del view
            if self.ring.valid(slot, seq):
                msg.header["geom"] = geometry
                self.push(self.out, Message("input", msg.header, (model_input,)))
                return
        self.counters["drop_overwritten"] += 1

    def stop(self) -> None:
        if getattr(self, "ring", None) is not None:
            self.ring.close()
