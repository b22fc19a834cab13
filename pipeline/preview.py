"""The live view's picture: a few downscaled sector crops a second, with the model's mask outline, published
by postprocess for the web viewer (pipeline/viewer). Previews are dropped, never queued: the PUB socket keeps
one message per subscriber and sends without blocking, so a slow or absent viewer costs the pipeline nothing
but the resize of a few frames a second."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import zmq

from .analysis import AnalyzedFrame
from .events import wall_time

PREVIEW_WIDTH = 360  # pixels across the crop, at most
PREVIEW_TOPIC = b"preview"


def outline(mask: np.ndarray, offset: tuple[float, float], scale: tuple[float, float],
            to_preview: float) -> list[list[list[float]]]:
    """The mask's outer contours in preview pixels: model pixel (u, v) -> crop pixel
    ((u - offset_x) / scale_x, ...) -> times the preview's scale."""
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    lines = []
    for contour in contours:
        points = contour.reshape(-1, 2).astype(np.float64)
        x = (points[:, 0] - offset[0]) / scale[0] * to_preview
        y = (points[:, 1] - offset[1]) / scale[1] * to_preview
        lines.append(np.round(np.stack([x, y], axis=1), 1).tolist())
    return lines


def preview_image(frame: AnalyzedFrame, image: np.ndarray) -> tuple[np.ndarray, dict]:
    """The downscaled grey crop of what the model saw, and its header (ids, capture time, score, outline)."""
    x, y, width, height = frame.geometry.roi
    crop = image[y:y + height, x:x + width]
    if crop.ndim == 3:
        crop = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    to_preview = min(1.0, PREVIEW_WIDTH / max(1, crop.shape[1]))
    size = (max(1, round(crop.shape[1] * to_preview)), max(1, round(crop.shape[0] * to_preview)))
    small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    header = {"frame_id": frame.info.frame_id, "t_capture": wall_time(frame.t_capture_ns),
              "score": round(frame.info.score, 4), "width": size[0], "height": size[1],
              "outline": [] if frame.mask is None else outline(frame.mask, frame.geometry.offset,
                                                                 frame.geometry.scale, to_preview)}
    return small, header


class PreviewFeed:
    """Postprocess's side: offered every scored newest frame, publishes `fps` of them a second."""

    def __init__(self, socket: zmq.Socket, fps: float) -> None:
        self._socket = socket
        self._period = 1.0 / fps
        self.bound = socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._next = 0.0
        self.dropped = 0

    @classmethod
    def open(cls, context: zmq.Context, fps: float, endpoint: str = "tcp://127.0.0.1:*") -> PreviewFeed:
        socket = context.socket(zmq.PUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 1)
        socket.bind(endpoint)
        return cls(socket, fps)

    def offer(self, frame: AnalyzedFrame, image: np.ndarray) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._period
        small, header = preview_image(frame, image)
        try:
            self._socket.send_multipart([PREVIEW_TOPIC, json.dumps(header).encode(), small.tobytes()],
                                        flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        self._socket.close()
