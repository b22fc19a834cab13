"""The live view's preview feed over a real ZeroMQ PUB/SUB pair: its rate is `run.viewer_preview_fps`,
its picture the downscaled crop of what the model saw, and a feed nobody reads never blocks."""

from __future__ import annotations

import json
import time

import numpy as np
import zmq

from pipeline.analysis import AnalyzedFrame
from pipeline.letterbox import Geometry
from pipeline.preview import PREVIEW_TOPIC, PREVIEW_WIDTH, PreviewFeed
from pipeline.sweep import FrameInfo

FRAME = np.tile(np.arange(720, dtype=np.uint8), (480, 1))
GEOMETRY = Geometry(roi=(0, 0, 720, 480), offset=(0.0, 16.0), content=(224.0, 149.3), scale=(0.311, 0.311))


def _frame(frame_id: int) -> AnalyzedFrame:
    return AnalyzedFrame(FrameInfo(frame_id, frame_id / 30, 0.5), time.monotonic_ns(), None, GEOMETRY,
                         FRAME.shape, None)


def _offer_for(feed: PreviewFeed, seconds: float) -> int:
    """Offers frames as fast as it can for `seconds` (far above any preview rate); returns how many."""
    offered, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        feed.offer(_frame(offered), FRAME)
        offered += 1
        time.sleep(0.002)
    return offered


def test_the_feed_publishes_at_its_rate_the_downscaled_crop() -> None:
    context = zmq.Context()
    feed = PreviewFeed.open(context, fps=4.0)
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, PREVIEW_TOPIC)
    sub.setsockopt(zmq.RCVHWM, 1000)
    sub.connect(feed.bound)
    try:
        time.sleep(0.3)  # the subscription reaches the PUB
        feed.offer(_frame(0), FRAME)  # the first offer publishes at once; the rate counts from it
        start = time.monotonic()
        offered = _offer_for(feed, 2.0)
        elapsed = time.monotonic() - start
        received = []
        while sub.poll(200):
            received.append(sub.recv_multipart())
        assert offered > 100
        # One at once, then at most one per 0.25 s of the offering; at least half that even where this
        # machine's sleeps run late (each preview is due a period after the last one sent).
        assert elapsed * 4.0 / 2 <= len(received) <= 1 + elapsed * 4.0 + 0.5, (len(received), elapsed)
        topic, header, pixels = received[0]
        header = json.loads(header)
        assert topic == PREVIEW_TOPIC and header["frame_id"] == 0
        assert header["width"] == PREVIEW_WIDTH and header["height"] == 240
        assert len(pixels) == header["width"] * header["height"]
    finally:
        sub.close()
        feed.close()
        context.term()


def test_a_feed_nobody_reads_never_blocks() -> None:
    context = zmq.Context()
    feed = PreviewFeed.open(context, fps=30.0)
    try:
        assert _offer_for(feed, 0.5) > 20  # no subscriber: sends are dropped, offers go on
    finally:
        feed.close()
        context.term()
