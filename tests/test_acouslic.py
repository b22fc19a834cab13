"""ACOUSLIC-AI metrics (pipeline/acouslic.py) and tools/evaluate.py on tiny crafted .mha cases."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import acouslic
from pipeline.biometry import ramanujan_perimeter

sitk = pytest.importorskip("SimpleITK")

ROOT = Path(__file__).resolve().parents[1]
H, W = 160, 200
FPS = 10  # frames per sweep in the crafted cases
N = 6 * FPS
AXES = (60, 42)  # semi-axes in px of the crafted abdomen
REF_AC = ramanujan_perimeter(*AXES) * acouslic.PIXEL_SPACING_MM


def ellipse(label: int = 1, axes=AXES, center=(100, 80)) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    cv2.ellipse(m, center, axes, 0, 0, 360, label, -1)
    return m


def fov() -> np.ndarray:
    f = np.zeros((H, W), np.uint8)
    f[2:-2, 2:-2] = 1
    return f


def stack(labels: dict[int, int]) -> np.ndarray:
    gt = np.zeros((N, H, W), np.uint8)
    for f, lab in labels.items():
        gt[f] = ellipse(lab)
    return gt


REFS = [REF_AC] * 6


def test_oracle_is_maximum():
    gt = stack({3: 2, 4: 1, 5: 1, 6: 2, 25: 1})
    r = acouslic.evaluate_case(gt, (gt[4] != 0).astype(np.uint8), 4, REFS, fov(), frames_per_sweep=FPS)
    assert r.wfss == 1.0
    assert r.dsc_soft == 1.0 and r.dsc == 1.0
    assert r.nae < 0.02  # ellipse fit on pixel outlines reads ~pi px short
    assert r.ac_status == "ok" and r.sweep == 0
    assert r.score == pytest.approx(acouslic.ranking_score(r.nae, 1.0, 1.0))
    assert r.score > 0.99


def test_suboptimal_choice_scores_06():
    gt = stack({3: 2, 4: 1})
    assert acouslic.compute_wfss(gt, 3) == 0.6
    assert acouslic.compute_wfss(gt, 4) == 1.0
    assert acouslic.compute_wfss(gt, 10) == 0.0
    assert acouslic.compute_wfss(gt, -1) == 0.0


def test_no_optimal_frame_in_case():
    gt = stack({3: 2, 14: 2})
    assert acouslic.compute_wfss(gt, 14) == 1.0  # best available plane
    assert acouslic.compute_wfss(gt, 0) == 0.0
    assert acouslic.compute_wfss(gt, -1) == 0.0
    empty = stack({})
    for f in (-1, 0, 30):  # nothing annotated at all: official score is 0 whatever is chosen
        assert acouslic.compute_wfss(empty, f) == 0.0


def test_frame_minus_one():
    gt = stack({4: 1})
    r = acouslic.evaluate_case(gt, None, -1, REFS, fov(), frames_per_sweep=FPS)
    assert (r.wfss, r.nae, r.dsc_soft, r.sweep, r.pred_ac_mm) == (0.0, 1.0, 0.0, None, None)
    assert r.score == 0.0
    with pytest.raises(ValueError):
        acouslic.evaluate_case(gt, ellipse(), N, REFS, fov(), frames_per_sweep=FPS)


def test_sweep_without_reference_ac():
    gt = stack({4: 1, 24: 1})
    refs = [REF_AC, None, float("nan"), REF_AC, REF_AC, REF_AC]
    r = acouslic.evaluate_case(gt, ellipse(), 24, refs, fov(), frames_per_sweep=FPS)
    assert r.sweep == 2 and r.ref_ac_mm is None and r.pred_ac_mm is not None
    assert r.nae == 1.0 and r.wfss == 1.0 and r.dsc_soft == 1.0
    r1 = acouslic.evaluate_case(gt, ellipse(), 4, refs, fov(), frames_per_sweep=FPS)
    assert r1.nae < 0.02


def test_nae_uses_larger_ac():
    assert acouslic.nae(200.0, 100.0) == pytest.approx(0.5)
    assert acouslic.nae(100.0, 200.0) == pytest.approx(0.5)
    assert acouslic.nae(None, 100.0) == 1.0 and acouslic.nae(100.0, None) == 1.0


def test_empty_gt_frame_neighbour_five_frames_away():
    fps = 30
    gt = np.zeros((2 * fps, H, W), np.uint8)
    gt[5] = ellipse(1)
    pred = ellipse(1)
    r = acouslic.evaluate_case(gt, pred, 10, REFS, fov(), frames_per_sweep=fps)
    assert r.dsc == 0.0 and r.nearest_frame == 5 and r.dsc_nearest == 1.0
    assert r.dsc_soft == pytest.approx(1.0 - 5 / 15)
    # next frame only, also 5 away
    r2 = acouslic.evaluate_case(gt, pred, 0, REFS, fov(), frames_per_sweep=fps)
    assert r2.nearest_frame == 5 and r2.dsc_soft == pytest.approx(2 / 3)
    # the previous annotated frame wins even when a later one is nearer (official search order)
    gt[12] = ellipse(2)
    assert acouslic.nearest_annotated_frame(gt, 10, fps) == 5
    # beyond the tolerance or in another sweep: nothing
    gt2 = np.zeros_like(gt)
    gt2[fps + 2] = ellipse(1)
    assert acouslic.nearest_annotated_frame(gt2, fps - 2, fps) is None
    assert acouslic.nearest_annotated_frame(gt2, fps + 2 + 16, fps) is None
    r3 = acouslic.evaluate_case(gt2, pred, fps - 2, REFS, fov(), frames_per_sweep=fps)
    assert r3.dsc_soft == 0.0
    # an empty prediction gets the plain Dice, no neighbour
    r4 = acouslic.evaluate_case(gt, np.zeros((H, W), np.uint8), 10, REFS, fov(), frames_per_sweep=fps)
    assert r4.dsc_soft == 0.0 and r4.pred_ac_mm is None and r4.nae == 1.0


def test_dice_and_f1():
    a = np.zeros((4, 4)); b = np.zeros((4, 4))  # noqa: E702
    assert acouslic.dice(a, b) == 0.0
    a[:2] = 1; b[:1] = 1  # noqa: E702
    assert acouslic.dice(a, b) == pytest.approx(2 * 4 / 12)
    f = acouslic.frame_f1([0, 1, 2, 0, 2], [0, 1, 0, 1, 1])
    assert (f.tp, f.fp, f.fn, f.tn) == (2, 1, 1, 1)
    assert f.f1 == pytest.approx(2 / 3)
    assert acouslic.frame_f1([0, 0], [0, 0]).f1 == 1.0


def test_derive_fov_mask():
    imgs = np.zeros((3, H, W), np.uint8)
    cv2.circle(imgs[0], (100, 80), 60, 50, -1)
    imgs[1, 80, 100] = 0  # dark pixel inside: filled anyway
    imgs[2, 5, 5] = 200  # isolated speck outside: removed
    f = acouslic.derive_fov_mask(imgs)
    assert f.dtype == bool and f.shape == (H, W)
    assert f[80, 100] and not f[5, 5] and not f[0, 0]
    assert abs(int(f.sum()) - math.pi * 60**2) < 0.03 * math.pi * 60**2


# --- tools/evaluate.py end to end ------------------------------------------------------------------


def write_mha(a: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.28, 0.28, 1.0) if a.ndim == 3 else (0.28, 0.28))
    sitk.WriteImage(img, str(path), useCompression=True)


def make_dataset(root: Path) -> dict[str, np.ndarray]:
    cases = {"caseA": stack({3: 2, 4: 1, 5: 2}), "caseB": stack({13: 2, 14: 2}), "caseC": stack({22: 1})}
    images = np.zeros((N, H, W), np.uint8)
    images[:, 2:-2, 2:-2] = 30
    rows = []
    for cid, gt in cases.items():
        write_mha(gt, root / "cases/masks/stacked_fetal_abdomen" / f"{cid}.mha")
        write_mha(images, root / "cases/images/stacked_fetal_ultrasound" / f"{cid}.mha")
        rows.append([cid, "1", *[f"{REF_AC:.6f}" if s != 1 or cid != "caseB" else "" for s in range(6)]])
    (root / "cases/circumferences").mkdir(parents=True)
    csv_path = root / "cases/circumferences/fetal_abdominal_circumferences_per_sweep.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uuid", "subject_id", *[f"sweep_{i}_ac_mm" for i in range(1, 7)]])
        w.writerows(rows)
    return cases


def write_pred(root: Path, cid: str, frame: int, mask: np.ndarray, quality=None) -> None:
    d = root / "pred" / cid
    d.mkdir(parents=True, exist_ok=True)
    write_mha(mask, d / "fetal-abdomen-segmentation.mha")
    (d / "fetal-abdomen-frame-number.json").write_text(json.dumps(frame))
    if quality is not None:
        (d / "frame-quality.json").write_text(json.dumps(quality))


def run_eval(root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools/evaluate.py"), "--cases", str(root / "cases"),
           "--predictions", str(root / "pred"), "--out", str(root / "out"),
           "--frames-per-sweep", str(FPS), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_evaluate_end_to_end(tmp_path: Path):
    cases = make_dataset(tmp_path)
    # caseA: oracle, 3-D stack with only that frame filled, perfect quality labels
    a = cases["caseA"]
    pred_stack = np.zeros_like(a)
    pred_stack[4] = a[4] != 0
    write_pred(tmp_path, "caseA", 4, pred_stack, quality=acouslic.frame_labels(a).tolist())
    # caseB: suboptimal frame 14 in sweep 2 (no reference AC there), no optimal in case -> WFSS 1, NAE 1
    write_pred(tmp_path, "caseB", 14, (cases["caseB"][14] != 0).astype(np.uint8))
    # caseC: frame -1
    write_pred(tmp_path, "caseC", -1, np.zeros((H, W), np.uint8))
    p = run_eval(tmp_path)
    assert p.returncode == 0, p.stderr
    assert "caseA" in p.stdout and "F1" in p.stdout
    with (tmp_path / "out/per_case.csv").open() as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert float(rows["caseA"]["wfss"]) == 1.0 and float(rows["caseA"]["dsc_soft"]) == 1.0
    assert float(rows["caseA"]["nae"]) < 0.02
    assert float(rows["caseB"]["wfss"]) == 1.0 and float(rows["caseB"]["nae"]) == 1.0
    assert rows["caseB"]["ref_ac_mm"] == "" and rows["caseB"]["sweep"] == "1"
    assert float(rows["caseC"]["score"]) == 0.0 and rows["caseC"]["frame"] == "-1"
    s = json.loads((tmp_path / "out/summary.json").read_text())
    assert s["n_cases"] == 3 and s["f1"] == 1.0
    assert s["wfss"] == pytest.approx(2 / 3)
    assert s["dsc_soft"] == pytest.approx(2 / 3)
    nae_a = float(rows["caseA"]["nae"])
    assert s["nae"] == pytest.approx((nae_a + 2) / 3, abs=1e-6)
    assert s["score"] == pytest.approx(0.5 * (1 - s["nae"]) + 0.25 * s["wfss"] + 0.25 * s["dsc_soft"])

    # the given FOV mask path gives the same numbers here; no quality files -> f1 null
    (tmp_path / "pred/caseA/frame-quality.json").unlink()
    write_mha(fov(), tmp_path / "fov.mha")
    p = run_eval(tmp_path, "--fov-mask", str(tmp_path / "fov.mha"), "--quiet")
    assert p.returncode == 0, p.stderr
    s2 = json.loads((tmp_path / "out/summary.json").read_text())
    assert s2["f1"] is None and s2["score"] == pytest.approx(s["score"])


def test_evaluate_bad_input(tmp_path: Path):
    cases = make_dataset(tmp_path)
    for cid, gt in cases.items():
        write_pred(tmp_path, cid, 4, (gt[4] != 0).astype(np.uint8))
    (tmp_path / "pred/caseB/fetal-abdomen-frame-number.json").write_text("999")
    p = run_eval(tmp_path, "--quiet")
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "caseB" in err[0] and "out of range" in err[0]

    (tmp_path / "pred/caseB/fetal-abdomen-frame-number.json").write_text("4")
    write_pred(tmp_path, "caseC", 4, np.zeros((H, W + 1), np.uint8))
    p = run_eval(tmp_path, "--quiet")
    assert p.returncode == 2 and "caseC" in p.stderr and "shape" in p.stderr

    (tmp_path / "pred/caseC/fetal-abdomen-segmentation.mha").unlink()
    p = run_eval(tmp_path, "--quiet")
    assert p.returncode == 2 and "fetal-abdomen-segmentation.mha: missing file" in p.stderr


def test_evaluate_help():
    p = subprocess.run([sys.executable, str(ROOT / "tools/evaluate.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--predictions" in p.stdout and "evaluation mode" in p.stdout


def test_convex_fov_from_one_frame_covers_a_sector_cut_by_black_fluid():
    """Fluid below the dynamic range is exactly 0 and splits a frame's sector; the live FOV must not
    shrink to the largest piece the way the whole-stack rule does on few frames."""
    import cv2

    sector = np.zeros((200, 300), np.uint8)
    cv2.ellipse(sector, (150, -40), (230, 230), 0, 60, 120, 1, -1)
    cv2.ellipse(sector, (150, -40), (60, 60), 0, 0, 360, 0, -1)  # near arc: a concave top edge
    frame = sector * np.uint8(90)
    frame[90:120] = 0  # a band of black fluid across the sector
    fov = acouslic.convex_fov_mask(frame)
    covered = (fov & (sector > 0)).sum() / (sector > 0).sum()
    assert covered > 0.999 and fov.sum() < 1.1 * (sector > 0).sum()
    assert acouslic.derive_fov_mask(frame[None]).sum() < 0.8 * (sector > 0).sum()
    assert not acouslic.convex_fov_mask(np.zeros((10, 10), np.uint8)).any()
