"""Every source kind is chosen from the URI and reports the same properties; image folders play in name order
(and, being screenshots of a screen, are cut to the sector); bare `phantom` is the phantom."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from test_stack_source import write_stack

from pipeline.screens import LAYOUTS, screen_frames
from pipeline.sources import SourceError, check_uri, open_source, source_class

PROPERTIES = {"uri", "kind", "fps", "live", "width", "height", "pixel_format", "pixel_spacing_mm",
              "sweep_boundaries"}


@pytest.mark.parametrize(("uri", "kind"), [
    ("phantom", "PhantomSource"), ("phantom://3?cases=2&fps=10", "PhantomSource"),
    ("synthetic://64x48", "SyntheticSource"), ("/dev/video0", "V4l2Source"),
    ("v4l2:///dev/video1?fps=30", "V4l2Source"), ("rtsp://cart/live", "StreamSource"),
    ("udp://127.0.0.1:5000", "StreamSource"), ("srt://127.0.0.1:9000", "StreamSource"),
    ("https://cart/live.m3u8", "StreamSource"), ("cine.dcm", "DicomSource"), ("case.mha", "StackSource"),
    ("sweep.mp4", "VideoSource")])
def test_the_uri_names_the_source_kind(uri: str, kind: str) -> None:
    assert source_class(uri).__name__ == kind


def test_phantom_and_synthetic_report_their_properties() -> None:
    phantom = open_source("phantom", "gray", "auto")
    described = phantom.describe()
    assert set(described) >= PROPERTIES and described["seed"] == 0
    assert (described["width"], described["height"]) == (744, 562) and described["sweep_boundaries"] is True
    assert described["pixel_spacing_mm"] == [0.28, 0.28]
    synthetic = open_source("synthetic://64x48?frames=2", "gray", "auto")
    assert set(synthetic.describe()) >= PROPERTIES and synthetic.describe()["width"] == 64


def test_an_image_folder_plays_in_name_order_cut_to_the_sector(tmp_path: Path) -> None:
    layout = LAYOUTS[3]
    screens = [screen for screen, _ in screen_frames(layout, frames=24)]
    for i, screen in enumerate(screens):
        cv2.imwrite(str(tmp_path / f"shot{i:03d}.png"), screen)
    whole = open_source(str(tmp_path), "gray", None)
    first = whole.read()
    assert first.image.shape == (1024, 1280) and np.array_equal(first.image, cv2.cvtColor(screens[0],
                                                                                          cv2.COLOR_BGR2GRAY))
    cut = open_source(str(tmp_path), "gray", "auto")
    x, y, w, h = cut.sector.box
    assert abs(w - layout.truth_box()[2]) <= 3 and cut.read().image.shape == (h, w)
    assert cut.describe()["images"] == 24


def test_an_empty_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no image stacks"):
        check_uri(str(tmp_path))


def _frames(source) -> list:  # noqa: ANN001
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    return frames


@pytest.mark.parametrize("uri", ["phantom://3?cases=2&frames=12", "mp4", "stacks", "images"])
def test_seek_goes_on_from_the_frame_reading_through_would(uri: str, mp4_60: Path, tmp_path: Path) -> None:
    """A restarted capture's Source.seek: the phantom, image stacks and image folders jump (they know their
    length), a video reads past the frames before (the default); all land on the very frame reading would,
    through loops too, and past the end without a loop they are over."""
    if uri == "mp4":
        uri = str(mp4_60)
    elif uri == "stacks":
        write_stack(tmp_path / "case-a.mha", 12)
        write_stack(tmp_path / "case-b.mha", 7)
        uri = str(tmp_path)
    elif uri == "images":
        for i in range(9):
            cv2.imwrite(str(tmp_path / f"shot{i:02d}.png"), np.full((16, 24, 3), 20 * i, np.uint8))
        uri = str(tmp_path)
    every = _frames(open_source(uri, "gray", None))
    for index, loop in ((0, False), (7, False), (len(every) - 1, False), (len(every) + 5, True),
                        (3 * len(every) + 2, True)):
        source = open_source(uri, "gray", None)
        source.seek(index, loop)
        got, expected = source.read(), every[index % len(every)]
        assert got.index == expected.index and got.meta == expected.meta
        assert np.array_equal(got.image, expected.image)
    source = open_source(uri, "gray", None)
    source.seek(len(every), False)
    assert source.read() is None
