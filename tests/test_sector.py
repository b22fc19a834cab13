"""The imaging sector found on synthetic machine screens (phantom sectors with burned-in patient text, a depth
scale, grey and colour bars and a logo around them), held steady, found again after a layout change, and
cut at the source so nothing of the screen around it goes on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.letterbox import crop
from pipeline.phantom import HEIGHT, WIDTH
from pipeline.screens import LAYOUTS, ScreenLayout, screen_frames, write_recording
from pipeline.sector import CHECK_EVERY, SectorTracker, find_sector, to_gray
from pipeline.sector_check import box_error
from pipeline.sources import open_source

REPO = Path(__file__).resolve().parents[1]

BOX_TOLERANCE_PX = 3


def write_screen_recording(path: Path, layout: ScreenLayout, frames: int, seed: int = 7) -> Path:
    return write_recording(path, (screen for screen, _ in screen_frames(layout, seed, frames)))


@pytest.mark.parametrize("layout", LAYOUTS,
                         ids=lambda lay: f"{lay.size[0]}x{lay.size[1]}@{lay.origin}x{lay.scale}")
def test_sector_box_is_recovered_within_a_few_pixels(layout: ScreenLayout) -> None:
    tracker = SectorTracker()
    boxes = [getattr(tracker.update(to_gray(screen)), "box", None) for screen, _ in screen_frames(layout)]
    assert boxes[-1] is not None
    assert box_error(boxes[-1], layout.truth_box()) <= BOX_TOLERANCE_PX
    # Held once found: the same box on every later frame (no flicker).
    first = next(i for i, box in enumerate(boxes) if box is not None)
    assert first <= 3 * CHECK_EVERY and len(set(boxes[first:])) == 1


def test_outline_is_the_fan_not_its_box() -> None:
    layout = LAYOUTS[0]
    tracker = SectorTracker()
    for screen, _ in screen_frames(layout):
        sector = tracker.update(to_gray(screen))
    mask = sector.mask
    # The fan's top corners lie outside it; its centre column is inside from the top to near the bottom.
    assert mask[0, 0] == 0 and mask[0, -1] == 0 and mask[mask.shape[0] // 2, mask.shape[1] // 2] == 1
    assert 0.6 < mask.mean() < 0.9


def test_a_still_screen_or_a_ticking_clock_is_no_sector() -> None:
    screen = LAYOUTS[0].background()
    active = np.zeros(screen.shape[:2], bool)
    assert find_sector(active) is None
    active[1040:1060, 10:120] = True  # a clock's digits changing
    assert find_sector(active) is None


def test_a_layout_change_is_found_again_and_the_old_sector_held_meanwhile() -> None:
    before, after = LAYOUTS[0], ScreenLayout(LAYOUTS[0].size, (500, 200), 1.3)
    tracker = SectorTracker()
    for screen, _ in screen_frames(before, frames=30):
        tracker.update(to_gray(screen))
    assert box_error(tracker.sector.box, before.truth_box()) <= BOX_TOLERANCE_PX
    boxes = []
    for screen, _ in screen_frames(after, frames=40):
        boxes.append(tracker.update(to_gray(screen)).box)  # never None: the old sector is held
    assert tracker.layout_changes == 1
    assert box_error(boxes[-1], after.truth_box()) <= BOX_TOLERANCE_PX
    assert len(set(boxes)) == 2  # one switch, no flicker


def test_crop_masks_outside_the_outline() -> None:
    frame = np.full((100, 120, 3), 200, np.uint8)
    cut = crop(frame, (10, 20, 50, 40), np.triu(np.ones((40, 50), np.uint8)))
    assert cut.shape == (40, 50, 3) and cut[0, -1].tolist() == [200] * 3 and cut[-1, 0].tolist() == [0] * 3
    assert crop(frame[..., 0], (10, 20, 50, 40)).shape == (40, 50)


def test_screen_recording_passes_on_only_the_sector(tmp_path: Path) -> None:
    """PHI-free: what leaves the source is exactly the phantom's image inside the fan, nothing of the
    screen around it, from the first frame on (the recording is looked through, then rewound)."""
    layout = LAYOUTS[3]
    video = write_screen_recording(tmp_path / "screen.mkv", layout, 30)
    source = open_source(str(video), "bgr24", "auto")
    sector = source.sector
    assert box_error(sector.box, layout.truth_box()) <= BOX_TOLERANCE_PX
    (x0, y0), (x, y, w, h) = layout.origin, sector.box
    for (_, raw), index in zip(screen_frames(layout, frames=30), range(30), strict=True):
        frame = source.read()
        assert frame.index == index and frame.image.shape == (h, w, 3)
        expected = raw[y - y0:y - y0 + h, x - x0:x - x0 + w] * sector.mask
        assert np.array_equal(frame.image[..., 1], expected)  # grey image, zero outside the fan
        assert frame.meta["sector"]["box"] == list(sector.box) and frame.meta["colour_doppler"] is False
    assert source.read() is None
    described = source.describe()
    assert described["sector"]["box"] == list(sector.box) and described["width"] == layout.size[0]
    source.close()


def test_colour_doppler_inside_the_sector_is_flagged(tmp_path: Path) -> None:
    layout = LAYOUTS[3]
    x, y, w, h = layout.truth_box()
    frames = []
    for screen, _ in screen_frames(layout, frames=30):
        screen[y + h // 2:y + h // 2 + 60, x + w // 2 - 40:x + w // 2 + 40] = (20, 30, 220)  # a red flow box
        frames.append(screen)
    path = write_recording(tmp_path / "doppler.mkv", frames)
    source = open_source(str(path), "bgr24", "auto")
    assert source.read().meta["colour_doppler"] is True
    source.close()


def test_fixed_roi_and_none_and_stack_sources_stay_whole(tmp_path: Path) -> None:
    video = write_screen_recording(tmp_path / "screen.mkv", LAYOUTS[3], 3)
    fixed = open_source(str(video), "gray", (100, 50, 300, 200))
    assert fixed.read().image.shape == (200, 300)
    assert open_source(str(video), "gray", None).read().image.shape == (1024, 1280)
    phantom = open_source("phantom://3?cases=1&frames=4", "gray", "auto")
    assert phantom.read().image.shape == (HEIGHT, WIDTH)  # a phantom is a sector already


def test_inspect_source_prints_the_box_last_and_draws_it(tmp_path: Path) -> None:
    layout = LAYOUTS[3]
    video = write_screen_recording(tmp_path / "screen.mkv", layout, 25)
    png = tmp_path / "roi.png"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_source.py"), str(video), "--out",
                             str(png)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert box_error(tuple(int(v) for v in lines[-1].split()), layout.truth_box()) <= BOX_TOLERANCE_PX
    assert "width: 1280" in lines and "height: 1024" in lines
    drawn = cv2.imread(str(png))
    x, y = layout.truth_box()[:2]
    assert drawn.shape == (1024, 1280, 3) and tuple(drawn[y + 50, x]) == (40, 220, 40)  # the box's left edge
    missing = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_source.py"), "/nonexistent.mp4"],
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 1 and missing.stderr.strip() == "inspect_source: source /nonexistent.mp4: " \
        "cannot open: [Errno 2] No such file or directory: '/nonexistent.mp4'"


def test_check_sector_reports_the_largest_box_error() -> None:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "check_sector.py"), "--agreement", "0",
                             "--frames", "25"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    worst = int(result.stdout.strip().splitlines()[-1].split(": ")[-1].split()[0])
    assert worst <= BOX_TOLERANCE_PX
