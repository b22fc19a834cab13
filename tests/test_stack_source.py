"""Image-stack source (.mha via SimpleITK): one case per file, 6 sweeps, spacing from the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.sources import SourceError, check_uri, open_source


def write_stack(path: Path, frames: int, spacing=(0.3, 0.25)) -> np.ndarray:
    stack = np.random.default_rng(frames).integers(0, 255, (frames, 20, 30), dtype=np.uint8)
    image = sitk.GetImageFromArray(stack)
    image.SetSpacing((spacing[0], spacing[1], 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return stack


def test_a_case_folder_streams_every_stack_with_sweeps_and_spacing(tmp_path: Path) -> None:
    folder = tmp_path / "images" / "stacked_fetal_ultrasound"
    first = write_stack(folder / "case-a.mha", 12)
    second = write_stack(folder / "case-b.mha", 7)  # not divisible by 6: one sweep
    check_uri(str(tmp_path))
    source = open_source(str(tmp_path), "gray")
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    assert len(frames) == 19
    assert np.array_equal(frames[0].image, first[0]) and np.array_equal(frames[12].image, second[0])
    assert [f.meta["sweep"] for f in frames[:12]] == [i // 2 for i in range(12)]
    assert {f.meta["sweep"] for f in frames[12:]} == {0}
    assert frames[13].meta == {"case": "case-b", "sweep": 0, "sweep_frame": 1, "case_frame": 1,
                               "pixel_spacing_mm": [0.25, 0.3]}  # (row, column) = (y, x)
    assert [f.index for f in frames] == list(range(19))
    source.rewind()
    assert source.read().meta["case"] == "case-a"
    bgr = open_source(str(folder / "case-a.mha"), "bgr24").read()
    assert bgr.image.shape == (20, 30, 3)


def test_bad_stacks_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no image stacks"):
        check_uri(str(tmp_path))
    broken = tmp_path / "broken.mha"
    broken.write_text("not an image")
    source = open_source(str(broken), "gray")
    with pytest.raises(SourceError, match="broken.mha: cannot read image stack"):
        source.read()


def test_the_next_stack_is_read_while_the_current_one_plays(tmp_path: Path) -> None:
    """Stacks are read on the source's reader thread, the next one as soon as the current one starts; what
    goes wrong there (a broken second stack) is raised, naming the file, at its turn: after every frame of
    the first."""
    import threading

    write_stack(tmp_path / "a.mha", 6)
    (tmp_path / "b.mha").write_text("not an image")
    source = open_source(str(tmp_path), "gray")
    played = [source.read()]
    assert any(t.name.startswith("stack-reader") for t in threading.enumerate())
    played += [source.read() for _ in range(5)]
    assert [f.meta["case"] for f in played] == ["a"] * 6
    with pytest.raises(SourceError, match="b.mha: cannot read image stack"):
        source.read()
    source.close()


def test_a_seek_skips_the_stacks_before_its_frame_unread(tmp_path: Path) -> None:
    """A restarted capture seeking into the third stack reads the first two's headers only: their pixel
    data cut away (header intact), the seek still lands on the third stack's frame."""
    write_stack(tmp_path / "case-a.mha", 12)
    write_stack(tmp_path / "case-b.mha", 7)
    third = write_stack(tmp_path / "case-c.mha", 6)
    for name in ("case-a.mha", "case-b.mha"):
        path = tmp_path / name
        data = path.read_bytes()
        path.write_bytes(data[: data.index(b"ElementDataFile = LOCAL") + len(b"ElementDataFile = LOCAL\n")])
    source = open_source(str(tmp_path), "gray")
    source.seek(12 + 7 + 4, loop=False)
    frame = source.read()
    assert frame.index == 23 and frame.meta["case"] == "case-c" and frame.meta["case_frame"] == 4
    assert np.array_equal(frame.image, third[4])
    source.rewind()
    with pytest.raises(SourceError, match="case-a.mha: cannot read image stack"):
        source.read()  # from the start, the cut stack is read, and fails
