from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.preprocess import letterbox


def test_pad_square_equals_padding_then_resizing() -> None:
    rng = np.random.default_rng(0)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (540, 960), dtype=np.uint8), (9, 9), 3)
    out, geometry = letterbox(frame, 224, 1, interpolation="area")
    padded = np.zeros((960, 960), dtype=np.uint8)
    padded[210:750] = frame
    reference = cv2.resize(padded, (224, 224), interpolation=cv2.INTER_AREA)
    assert out.shape == (224, 224) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - reference.astype(int))[8:-8].max() <= 2  # away from the pad edge
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
