"""The embedded default end to end: the demo bundle on phantom sweeps, checked against the phantom's truth.

Shortened (70 frames per sweep instead of 140) and lossless, so that a loaded CI machine cannot drop the
two frames that cross the standard plane; otherwise it is `python run_stream.py` as a newcomer runs it:
the default bundle and engine, paced live at 30 fps, with the console view."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from conftest import REPO, read_journal

from engines.bundle import load_bundle
from pipeline.config import DEFAULT_BUNDLE, DEFAULT_SOURCE
from pipeline.phantom import make_cases

SEED, FRAMES = 6, 70


def test_the_default_is_the_demo_bundle_on_phantom_sweeps() -> None:
    bundle = load_bundle(DEFAULT_BUNDLE)
    assert bundle.name == "demo" and "quality" in bundle.outputs and "mask" in bundle.outputs
    assert DEFAULT_SOURCE.startswith("phantom://")
    training = bundle.manifest["training"]
    assert training["seeds"]["phantom_train"][0] >= 1000 > SEED  # the demo streams a case never trained on
    assert sum(p.stat().st_size for p in Path(DEFAULT_BUNDLE).iterdir()) < 10 * 2**20


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "run"
    cmd = [sys.executable, str(REPO / "run_stream.py"), "--source", f"phantom://{SEED}?frames={FRAMES}",
           "--out", str(out), "--events", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
           "--set", "transport.policy=lossless"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return out, result


def test_demo_picks_the_optimal_frame_and_measures_the_phantom_ac(demo_run) -> None:
    out, _ = demo_run
    truth_ac = make_cases(SEED, 1, FRAMES)[0].fetus.ac_mm
    events = read_journal(out)
    label = {e["frame_id"]: e["source"]["gt_label"] for e in events if e["type"] == "frame"}
    assert len(label) == 6 * FRAMES
    sweep_labels: dict[int, set[int]] = {}
    for e in events:
        if e["type"] == "frame":
            sweep_labels.setdefault(e["sweep_id"], set()).add(e["source"]["gt_label"])
    finals = {e["sweep_id"]: e for e in events if e["type"] == "best_frame" and e["final"]}
    biometry = {e["sweep_id"]: e for e in events if e["type"] == "biometry" and e["final"]}
    assert sorted(finals) == list(range(6))
    with_optimal = [s for s, labels in sweep_labels.items() if 1 in labels]
    assert with_optimal, "the phantom case should cross the standard plane"
    for sweep in with_optimal:
        assert label[finals[sweep]["frame_id"]] == 1, f"sweep {sweep}: the chosen frame is not optimal"
        assert biometry[sweep]["ac_mm"] == pytest.approx(truth_ac, rel=0.03)
        assert 12 < biometry[sweep]["ga_weeks"] < 42
        mask = cv2.imread(str(out / finals[sweep]["mask_png"]), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (562, 744) and mask.any()
    for sweep, labels in sweep_labels.items():
        if labels == {0}:  # no abdomen anywhere in the sweep: nothing worth measuring
            assert finals[sweep]["frame_id"] is None and finals[sweep]["reason"] == "no good frame"


def test_demo_console_shows_best_frames_and_biometry_lines(demo_run) -> None:
    _, result = demo_run
    lines = result.stderr.splitlines()
    assert any("final best frame" in line and "score" in line for line in lines)
    assert any("AC (median of top frames)" in line and " mm " in line and "weeks" in line for line in lines)
    assert any(line.startswith("run ") and "completed" in line and "0 dropped" in line for line in lines)
