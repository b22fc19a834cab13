from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.preprocess import letterbox


def test_pad_square_equals_padding_then_resizing() -> None:
    """Within a grey level of the slow reference on image content at the model's scale (the two-step
    filter differs only in how it splits the 4.3x reduction)."""
    rng = np.random.default_rng(0)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (540, 960), dtype=np.uint8), (0, 0), 6)
    out, geometry = letterbox(frame, 224, 1, interpolation="area")
    padded = np.zeros((960, 960), dtype=np.uint8)
    padded[210:750] = frame
    reference = cv2.resize(padded, (224, 224), interpolation=cv2.INTER_AREA)
    assert out.shape == (224, 224) and out.dtype == np.uint8
    difference = np.abs(out.astype(int) - reference.astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.3
    assert geometry["content"] == [224, 126] and geometry["offset"] == [0, 49]


def test_color_frame_becomes_gray_and_roi_is_applied() -> None:
    frame = np.zeros((480, 640, 3), dtype=np.uint8)
    frame[100:300, 200:400] = (0, 255, 0)
    out, geometry = letterbox(frame, 224, 1, roi=(200, 100, 200, 200))
    assert out.shape == (224, 224)
    green_as_gray = cv2.cvtColor(np.array([[[0, 255, 0]]], np.uint8), cv2.COLOR_BGR2GRAY)[0, 0]
    assert np.all(np.abs(out.astype(int) - int(green_as_gray)) <= 1)
    assert geometry["roi"] == [200, 100, 200, 200] and geometry["scale"] == [1.12, 1.12]


def test_three_channel_input_and_no_padding() -> None:
    out, geometry = letterbox(np.full((100, 50), 7, np.uint8), 32, 3, pad_to_square=False)
    assert out.shape == (32, 32, 3) and np.all(out == 7)
    assert geometry["scale"] == [32 / 50, 32 / 100]


def test_empty_roi_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty frame"):
        letterbox(np.zeros((10, 10), np.uint8), 8, 1, roi=(20, 20, 5, 5))


def test_whole_factor_shrink_keeps_the_geometry_exact() -> None:
    """A frame whose size is not a multiple of the whole factor loses its edge pixels evenly, and the
    geometry says so: mapping a model pixel back lands on the frame pixel it came from."""
    frame = np.zeros((1080, 1925), np.uint8)
    frame[500:540, 1000:1040] = 255
    out, geometry = letterbox(frame, 224, 1)
    assert geometry["roi"] == [2, 0, 1920, 1080] and geometry["content"] == [224, 126]
    v, u = np.argwhere(out > 128).mean(axis=0)
    x = geometry["roi"][0] + (u + 0.5 - geometry["offset"][0]) / geometry["scale"][0]
    y = geometry["roi"][1] + (v + 0.5 - geometry["offset"][1]) / geometry["scale"][1]
    assert abs(x - 1020) < 4 and abs(y - 520) < 4
