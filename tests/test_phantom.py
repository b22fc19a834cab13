"""Phantom blind sweeps: ACOUSLIC-AI's format and shapes, exact AC truth, consistent labels, determinism."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from scipy.integrate import quad

sitk = pytest.importorskip("SimpleITK")

from conftest import REPO  # noqa: E402

from pipeline.phantom import (  # noqa: E402
    HEIGHT,
    PIXEL_MM,
    SWEEPS,
    WIDTH,
    Renderer,
    iter_case_frames,
    make_cases,
    render_case,
)

TOOL = REPO / "tools" / "make_phantom.py"
CSV_PATH = Path("circumferences") / "fetal_abdominal_circumferences_per_sweep.csv"
HEADER = ["uuid", "subject_id", *(f"sweep_{k}_ac_mm" for k in range(1, 7))]
OFFICIAL_SEED = 3  # its first case has an optimal frame


def make_phantom(out: Path, *args: str) -> Path:
    result = subprocess.run([sys.executable, str(TOOL), "--out", str(out), *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


def read_csv(root: Path) -> list[list[str]]:
    with open(root / CSV_PATH, newline="") as f:
        return list(csv.reader(f))


def perimeter(a: float, b: float) -> float:
    """Arc length by quadrature: independent of the library's complete elliptic integral."""
    return quad(lambda t: np.hypot(a * np.sin(t), b * np.cos(t)), 0, 2 * np.pi, epsabs=0, epsrel=1e-12)[0]


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.suffix in (".mha", ".csv")}


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom(tmp_path_factory.mktemp("official"), "--cases", "1", "--seed", str(OFFICIAL_SEED),
                        "--no-video")


def test_official_shapes_spacing_labels_and_csv(official: Path) -> None:
    rows = read_csv(official)
    assert rows[0] == HEADER and len(rows) == 2
    uid = rows[1][0]
    image = sitk.ReadImage(str(official / "images" / "stacked_fetal_ultrasound" / f"{uid}.mha"))
    mask = sitk.ReadImage(str(official / "masks" / "stacked_fetal_abdomen" / f"{uid}.mha"))
    for img in (image, mask):
        assert img.GetSize() == (WIDTH, HEIGHT, 840)
        assert img.GetPixelID() == sitk.sitkUInt8
        assert np.allclose(img.GetSpacing(), (0.28, 0.28, 1.0))
    images, masks = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(mask)
    assert images.shape == masks.shape == (840, 562, 744)
    assert set(np.unique(masks)) <= {0, 1, 2} and {1, 2} <= set(np.unique(masks))
    assert images.std() > 10  # not blank
    acs = [float(v) for v in rows[1][2:] if v]
    assert acs and all(150 <= ac <= 350 for ac in acs)
    # Each frame's mask carries one label; a sweep has a reference AC exactly when it has an optimal frame.
    frame_labels = masks.reshape(840, -1).max(axis=1)
    for frame, label in zip(masks, frame_labels, strict=True):
        assert set(np.unique(frame)) <= {0, int(label)}
    has_optimal = (frame_labels.reshape(SWEEPS, -1) == 1).any(axis=1)
    assert [bool(v) for v in rows[1][2:]] == has_optimal.tolist()


def test_optimal_mask_matches_reference_ac(official: Path) -> None:
    uid, _, *acs = read_csv(official)[1]
    ac = float(next(v for v in acs if v))
    path = official / "masks" / "stacked_fetal_abdomen" / f"{uid}.mha"
    masks = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    fetus = make_cases(OFFICIAL_SEED, 1)[0].fetus
    optimal = [frame for frame in masks if frame.max() == 1]
    assert optimal
    for frame in optimal:
        contours, _ = cv2.findContours((frame > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        (_, _), (w, h), _ = cv2.fitEllipse(max(contours, key=len))
        fitted = perimeter(w / 2 * PIXEL_MM, h / 2 * PIXEL_MM)
        assert fitted == pytest.approx(ac, rel=0.03)
        a, b = fetus.section_semi_axes
        assert np.count_nonzero(frame) * PIXEL_MM**2 == pytest.approx(np.pi * a * b, rel=0.04)


def test_ac_truth_is_the_exact_section_perimeter() -> None:
    for case in make_cases(11, 12, frames_per_sweep=2):
        a, b, c = case.fetus.semi_axes
        scale = np.sqrt(1 - (case.fetus.standard_z / c) ** 2)
        assert case.fetus.ac_mm == pytest.approx(perimeter(a * scale, b * scale), rel=1e-6)
        assert 150 <= case.fetus.ac_mm <= 350


def test_sweeps_vary_like_real_data() -> None:
    """Some sweeps have an optimal frame, some only suboptimal ones, some no abdomen at all."""
    kinds = set()
    for case in make_cases(5, 6):
        renderer = Renderer(case)
        for sweep in range(SWEEPS):
            labels = {renderer.truth(sweep, frame)["label"] for frame in range(case.frames_per_sweep)}
            kinds.add(1 if 1 in labels else 2 if 2 in labels else 0)
    assert kinds == {0, 1, 2}


def test_masks_non_empty_exactly_where_labelled() -> None:
    case = make_cases(3, 1, frames_per_sweep=16)[0]
    data = render_case(case)
    nonempty = data.masks.reshape(len(data.labels), -1).max(axis=1)
    assert np.array_equal(nonempty, data.labels)
    assert (data.labels > 0).any()
    first = next(iter_case_frames(case))
    assert first[1:3] == (0, 0) and np.array_equal(first[0], data.images[0])
    assert first[0].shape == (HEIGHT, WIDTH) and first[0].dtype == np.uint8


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    args = ("--cases", "2", "--frames-per-sweep", "4", "--no-video")
    a = digests(make_phantom(tmp_path / "a", *args, "--seed", "7"))
    b = digests(make_phantom(tmp_path / "b", *args, "--seed", "7"))
    c = digests(make_phantom(tmp_path / "c", *args, "--seed", "8"))
    assert len(a) == 5 and a == b
    assert set(a.values()).isdisjoint(c.values())


def test_video_decodes_to_every_frame(tmp_path: Path) -> None:
    out = make_phantom(tmp_path, "--cases", "1", "--frames-per-sweep", "5", "--seed", "1")
    uid = read_csv(out)[1][0]
    with av.open(str(out / "videos" / f"{uid}.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.average_rate) == ("h264", 30)
        frames = [f.to_ndarray(format="gray") for f in container.decode(stream)]
    assert len(frames) == SWEEPS * 5 and frames[0].shape == (HEIGHT, WIDTH)


def test_help() -> None:
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--frames-per-sweep" in result.stdout and "--no-video" in result.stdout
