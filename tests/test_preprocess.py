from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.letterbox import letterbox


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
    assert geometry.content == (224, 126) and geometry.offset == (0, 49)


def test_color_frame_becomes_gray_and_roi_is_applied() -> None:
    frame = np.zeros((480, 640, 3), dtype=np.uint8)
    frame[100:300, 200:400] = (0, 255, 0)
    out, geometry = letterbox(frame, 224, 1, roi=(200, 100, 200, 200))
    assert out.shape == (224, 224)
    green_as_gray = cv2.cvtColor(np.array([[[0, 255, 0]]], np.uint8), cv2.COLOR_BGR2GRAY)[0, 0]
    assert np.all(np.abs(out.astype(int) - int(green_as_gray)) <= 1)
    assert geometry.roi == (200, 100, 200, 200) and geometry.scale == (1.12, 1.12)


def test_three_channel_input_and_no_padding() -> None:
    out, geometry = letterbox(np.full((100, 50), 7, np.uint8), 32, 3, pad_to_square=False)
    assert out.shape == (32, 32, 3) and np.all(out == 7)
    assert geometry.scale == (32 / 50, 32 / 100)


def test_empty_roi_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty frame"):
        letterbox(np.zeros((10, 10), np.uint8), 8, 1, roi=(20, 20, 5, 5))


def test_whole_factor_shrink_keeps_the_geometry_exact() -> None:
    """A frame whose size is not a multiple of the whole factor loses its edge pixels evenly, and the
    geometry says so: mapping a model pixel back lands on the frame pixel it came from."""
    frame = np.zeros((1080, 1925), np.uint8)
    frame[500:540, 1000:1040] = 255
    out, geometry = letterbox(frame, 224, 1)
    assert geometry.roi == (2, 0, 1920, 1080) and geometry.content == (224, 126)
    v, u = np.argwhere(out > 128).mean(axis=0)
    x = geometry.roi[0] + (u + 0.5 - geometry.offset[0]) / geometry.scale[0]
    y = geometry.roi[1] + (v + 0.5 - geometry.offset[1]) / geometry.scale[1]
    assert abs(x - 1020) < 4 and abs(y - 520) < 4


def _ultrasound_like(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.rayleigh(30, (height, width))
    yy, xx = np.mgrid[0:height, 0:width]
    image += 120 * ((((xx - width / 2) / (width / 4)) ** 2 + ((yy - height / 2) / (height / 5)) ** 2) < 1)
    return np.clip(cv2.GaussianBlur(image, (0, 0), 1.5), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("height", "width"), [(562, 744), (1080, 1920), (800, 600), (300, 300)])
def test_bicubic_matches_open_clips_transform(height: int, width: int) -> None:
    """Parity with FetalCLIP's preprocessing: pad to a centred square, then open_clip's own eval transform
    (Pillow bicubic resize). Stated tolerance: at most one grey level (1/255) per pixel before the
    in-graph normalisation, which is the rounding of Pillow's shortcut for large reductions."""
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image

    frame = _ultrasound_like(height, width, seed=height + width)
    side = max(height, width)
    padded = np.zeros((side, side), np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    padded[top:top + height, left:left + width] = frame
    transform = open_clip.image_transform(224, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))
    reference = transform(Image.fromarray(padded).convert("RGB"))[0].numpy() * 255
    ours, geometry = letterbox(frame, 224, 1, interpolation="bicubic")
    difference = np.abs(ours.astype(float) - reference)
    assert difference.max() <= 1.0 + 1e-4 and difference.mean() < 0.15
    # The geometry places the content where the padded square put it.
    scale = geometry.scale[0]
    assert np.allclose(geometry.offset, [left * scale, top * scale])
    assert np.allclose(geometry.content, [width * scale, height * scale])


def test_in_graph_normalisation_equals_open_clips(tmp_path) -> None:
    """Our uint8 input through the exported wrapper's normalisation gives the embedding open_clip's own
    transform gives (same random tiny model of the FetalCLIP family)."""
    pytest.importorskip("open_clip")
    import open_clip
    import torch
    from PIL import Image

    from engines.export.fetalclip import CLIP_MEAN, CLIP_STD, FetalClipExport, build_model, load_config

    torch.manual_seed(0)
    model = build_model(load_config("tiny"))
    wrapper = FetalClipExport(model.visual, torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)).eval()
    frame = _ultrasound_like(562, 744, seed=7)
    side = 744
    padded = np.zeros((side, side), np.uint8)
    padded[91:91 + 562] = frame
    transform = open_clip.image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_image(transform(
            Image.fromarray(padded).convert("RGB"))[None]), dim=-1)[0]
        ours, _ = letterbox(frame, 224, 1, interpolation="bicubic")
        embedding = wrapper(torch.from_numpy(ours)[None])[0][0]
    assert float(embedding @ expected) > 0.9999


@pytest.mark.parametrize("interpolation", ["area", "bicubic"])
@pytest.mark.parametrize("shape,roi", [((562, 744), None), ((1080, 1920), (100, 50, 1600, 1000)),
                                       ((800, 600), None)])
def test_mask_maps_back_to_the_full_frame_through_the_inverse_letterbox(shape, roi, interpolation):
    from pipeline.letterbox import to_frame

    full = np.zeros(shape, np.uint8)
    cy, cx = shape[0] // 2, shape[1] // 2
    cv2.ellipse(full, (cx, cy), (shape[1] // 5, shape[0] // 4), 20, 0, 360, 1, -1)
    small, geometry = letterbox(full * 255, 224, 1, roi=roi, interpolation=interpolation)
    back = to_frame(small > 127, geometry, shape)
    expected = full.copy()
    if roi is not None:
        x, y, w, h = roi
        outside = np.ones(shape, bool)
        outside[y:y + h, x:x + w] = False
        expected[outside] = 0
    dice = 2 * (back & expected).sum() / (back.sum() + expected.sum())
    assert back.shape == shape and back.dtype == np.uint8
    assert dice > 0.99
    # Nothing outside the region the model saw.
    if roi is not None:
        assert not back[outside].any()


def test_content_fraction_tells_a_lifted_probe_from_tissue():
    from pipeline.letterbox import content_fraction

    rng = np.random.default_rng(0)
    tissue = rng.integers(30, 200, (562, 744), dtype=np.uint8)
    small, geometry = letterbox(tissue, 224, 1)
    assert content_fraction(small, geometry) > 0.95  # the zero padding is not counted
    dark, geometry = letterbox(np.full((562, 744), 5, np.uint8), 224, 1)
    assert content_fraction(dark, geometry) == 0.0
