"""DICOM ultrasound cine written with pydicom (uncompressed, RLE Lossless, JPEG Baseline YBR_FULL_422;
multi-frame and single-frame; a folder as one series) gives the right frames, spacing and frame times."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import read_journal, run_pipeline
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from pipeline.sources import SourceError, check_uri, open_source

ROWS, COLS = 96, 128
REGION = (10, 8, 100, 80)  # x, y, w, h of the ultrasound region


def cine(frames: int, seed: int = 0) -> np.ndarray:
    """Grey frames, each with its index written into a bright bar's position."""
    rng = np.random.default_rng(seed)
    stack = rng.integers(20, 120, size=(frames, ROWS, COLS), dtype=np.uint8)
    for i in range(frames):
        stack[i, :, 4 * i:4 * i + 4] = 250
    return stack


def us_dataset(frames: np.ndarray, *, series: str, instance: int = 1, regions: bool = True) -> Dataset:
    meta = FileMetaDataset()
    multi = len(frames) > 1
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.StudyDate = "DOE^JANE", "0042-7781", "20261201"
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "US", series, instance
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLS, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
        ds.FrameTime = 40.0  # ms: 25 fps
    if regions:
        region = Dataset()
        region.RegionSpatialFormat, region.RegionDataType = 1, 1
        x, y, w, h = REGION
        region.RegionLocationMinX0, region.RegionLocationMinY0 = x, y
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = x + w - 1, y + h - 1
        region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
        region.PhysicalDeltaX, region.PhysicalDeltaY = 0.028, 0.03
        ds.SequenceOfUltrasoundRegions = [region]
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def read_all(uri: str, pixel_format: str = "gray", roi=None) -> tuple[list, object]:
    source = open_source(uri, pixel_format, roi)
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    return frames, source


def test_uncompressed_multiframe_gives_frames_spacing_in_mm_and_frame_time(tmp_path: Path) -> None:
    stack = cine(6)
    path = save(us_dataset(stack, series=generate_uid()), tmp_path / "cine.dcm")
    frames, source = read_all(str(path))
    assert len(frames) == 6 and all(np.array_equal(f.image, s) for f, s in zip(frames, stack, strict=True))
    assert [f.pts for f in frames] == pytest.approx([0.04 * i for i in range(6)])
    assert source.fps == pytest.approx(25.0)
    assert frames[0].meta["pixel_spacing_mm"] == pytest.approx([0.3, 0.28])  # cm -> mm, row then column
    described = source.describe()
    assert described["pixel_spacing_mm"] == pytest.approx([0.3, 0.28]) and described["region"] == list(REGION)
    assert (described["width"], described["height"]) == (COLS, ROWS)
    assert "DOE" not in repr([f.meta for f in frames]) and "0042" not in repr([f.meta for f in frames])


def test_the_ultrasound_region_is_the_sector_box(tmp_path: Path) -> None:
    stack = cine(3)
    path = save(us_dataset(stack, series=generate_uid()), tmp_path / "cine.dcm")
    frames, _ = read_all(str(path), roi="auto")
    x, y, w, h = REGION
    assert np.array_equal(frames[1].image, stack[1, y:y + h, x:x + w])


def test_rle_lossless_is_exact_and_frame_time_vector_paces(tmp_path: Path) -> None:
    stack = cine(5, seed=1)
    ds = us_dataset(stack, series=generate_uid())
    del ds.FrameTime
    ds.FrameTimeVector = [0, 30, 50, 30, 50]
    ds.compress(RLELossless, stack)  # pydicom's own RLE encoder
    path = save(ds, tmp_path / "rle.dcm")
    frames, source = read_all(str(path))
    assert source.describe()["transfer_syntax"] == "RLE Lossless"
    assert all(np.array_equal(f.image, s) for f, s in zip(frames, stack, strict=True))
    assert [f.pts for f in frames] == pytest.approx([0.0, 0.03, 0.08, 0.11, 0.16])


def test_jpeg_baseline_ybr_full_422_colour_becomes_luma(tmp_path: Path) -> None:
    rgb = np.repeat(cine(4, seed=2)[..., None], 3, axis=-1)
    rgb[:, 40:60, 60:90] = (200, 40, 30)  # a colour Doppler patch
    encoded = []
    for frame in rgb:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95, subsampling=1)  # 4:2:2 YCbCr
        encoded.append(buffer.getvalue())
    ds = us_dataset(rgb[..., 0], series=generate_uid())
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path / "jpeg.dcm")
    frames, source = read_all(str(path))
    luma = (rgb @ np.array([0.299, 0.587, 0.114])).round()
    assert len(frames) == 4 and frames[0].image.shape == (ROWS, COLS)
    assert max(np.abs(f.image - luma[i]).mean() for i, f in enumerate(frames)) < 3  # JPEG loss only
    assert source.describe()["photometric"] == "YBR_FULL_422"
    colour, _ = read_all(str(path), "bgr24")
    b, g, r = colour[0].image[50, 75].astype(int)
    assert r > 150 and g < 90 and b < 90  # YBR converted, red stays red


def test_a_folder_of_single_frames_is_one_series_in_instance_order(tmp_path: Path) -> None:
    stack, series = cine(4, seed=3), generate_uid()
    folder = tmp_path / "series"
    folder.mkdir()
    for name, instance in zip(("d.dcm", "a.dcm", "c.dcm", "b.dcm"), (1, 2, 3, 4), strict=True):
        save(us_dataset(stack[instance - 1:instance], series=series, instance=instance), folder / name)
    frames, source = read_all(str(folder))
    assert all(np.array_equal(f.image, s) for f, s in zip(frames, stack, strict=True))
    assert [f.meta["sweep"] for f in frames] == [0, 0, 0, 0] and source.describe()["files"] == 4


def test_bad_dicom_input_is_one_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    save(us_dataset(cine(2), series=generate_uid()), folder / "a.dcm")
    save(us_dataset(cine(2), series=generate_uid()), folder / "b.dcm")
    with pytest.raises(SourceError, match="holds 2 series"):
        check_uri(str(folder))
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01\x02garbage")
    with pytest.raises(SourceError, match="broken.dcm"):
        open_source(str(broken), "gray")


def test_a_dicom_cine_runs_through_the_pipeline_cut_to_its_region(tmp_path: Path) -> None:
    stack = cine(12, seed=4)
    path = save(us_dataset(stack, series=generate_uid()), tmp_path / "cine.dcm")
    out = tmp_path / "run"
    result = run_pipeline("--source", str(path), "--out", str(out), "--quiet", "--flood",
                          "--set", "transport.policy=lossless")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"]["read"] == summary["frames"]["scored"] == 12
    source = summary["stages"]["capture"]["source"]
    assert source["kind"] == "DicomSource" and source["sector"]["box"] == list(REGION)
    frames = read_journal(out, "frame")
    assert frames[0]["source"]["pixel_spacing_mm"] == pytest.approx([0.3, 0.28])
    assert "DOE" not in (out / "events.jsonl").read_text()
