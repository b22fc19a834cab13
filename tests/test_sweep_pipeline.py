"""Sweep events, best-frame PNGs, operator control and evaluation mode through the real four-process
pipeline (reference bundle: its scores mean nothing clinically, the plumbing is what is checked here)."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import zmq
from conftest import REPO, read_journal, run_pipeline, run_stream_cmd

from pipeline.events import COMMON_FIELDS, SCHEMA_VERSION

EVALUATE = [sys.executable, str(REPO / "tools" / "evaluate.py")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_phantom_run_emits_sweep_events_in_order_with_best_frame_pngs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_pipeline("--source", "phantom://5?frames=16", "--out", str(out), "--quiet", "--flood",
                          "--set", "transport.policy=lossless", "--set", "sweep.min_score=0")
    assert result.returncode == 0, result.stderr
    events = read_journal(out)
    for event in events:
        assert set(COMMON_FIELDS) <= set(event) and event["schema"] == SCHEMA_VERSION
    kinds = [e["type"] for e in events]
    assert kinds.count("sweep_started") == kinds.count("sweep_ended") == 6
    finals = [e for e in events if e["type"] == "best_frame" and e["final"]]
    assert [e["sweep_id"] for e in finals] == list(range(6))
    frames = {e["frame_id"]: e for e in read_journal(out, "frame")}
    for final in finals:
        # The final's frame belongs to its sweep, and its PNGs are full resolution.
        assert frames[final["frame_id"]]["source"]["sweep"] == final["sweep_id"] == final["source"]["sweep"]
        image = cv2.imread(str(out / final["frame_png"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / final["mask_png"]), cv2.IMREAD_UNCHANGED)
        assert image.shape == mask.shape == (562, 744)
        ended = next(i for i, e in enumerate(events)
                     if e["type"] == "sweep_ended" and e["sweep_id"] == final["sweep_id"])
        assert events.index(final) < ended
        assert all(e.get("sweep_id") != final["sweep_id"] or e["type"] == "frame" for e in events[ended + 1:])
    biometry = [e for e in events if e["type"] == "biometry" and e["final"]]
    assert biometry and all(e["pixel_spacing_mm"] == [0.28, 0.28] and not e["uncalibrated"] for e in biometry)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["postprocess"]["counters"].get("best_image_missed", 0) == 0


def test_operator_marks_sweeps_on_the_control_socket(tmp_path: Path) -> None:
    out, port = tmp_path / "run", _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    cmd = run_stream_cmd("--source", "synthetic://320x240?fps=30&frames=240", "--quiet", "--out", str(out),
                         "--set", "sweep.min_score=0")
    cmd[cmd.index("--control") + 1] = endpoint
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    control = [sys.executable, str(REPO / "tools" / "sweep_control.py"), "--endpoint", endpoint,
               "--timeout", "30"]
    try:
        journal = out / "events.jsonl"
        deadline = time.monotonic() + 60
        while not (journal.exists() and journal.stat().st_size > 2000):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        start = subprocess.run([*control, "start"], capture_output=True, text=True, timeout=60)
        assert start.returncode == 0 and json.loads(start.stdout)["ok"], start.stderr
        time.sleep(1.0)
        stop = subprocess.run([*control, "stop"], capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0 and json.loads(stop.stdout)["command"] == "stop"
        with zmq.Context() as context, context.socket(zmq.REQ) as req:
            req.setsockopt(zmq.RCVTIMEO, 10000)
            req.connect(endpoint)
            req.send(b"rewind")
            assert req.recv_json()["ok"] is False
    finally:
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    events = read_journal(out)
    operated = [e for e in events
                if e["type"] in ("sweep_started", "sweep_ended") and e["reason"] == "operator"]
    started = [e for e in operated if e["type"] == "sweep_started"]
    assert len(started) == 1 and operated[-1]["type"] == "sweep_ended"
    sweep = started[0]["sweep_id"]
    assert operated[-1]["sweep_id"] == sweep and 15 <= operated[-1]["frame_count"] <= 60
    assert any(e["type"] == "best_frame" and e["final"] and e["sweep_id"] == sweep for e in events)
    # After stop, no further sweep opens: the operator has taken over.
    assert not [e for e in events if e["type"] == "sweep_started" and e["sweep_id"] > sweep]
    counters = json.loads((out / "summary.json").read_text())["stages"]["postprocess"]["counters"]
    assert counters["operator_start"] == counters["operator_stop"] == counters["operator_rejected"] == 1


def test_sweep_control_without_a_pipeline_is_one_line() -> None:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "sweep_control.py"), "start", "--endpoint",
                             f"tcp://127.0.0.1:{_free_port()}", "--timeout", "0.5"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "no answer" in result.stderr


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_phantom.py"), "--out", str(root),
                    "--cases", "2", "--seed", "21", "--frames-per-sweep", "12", "--no-video"],
                   check=True, capture_output=True, timeout=300)
    return root


def test_evaluation_mode_runs_the_pipeline_and_writes_the_prediction_layout(phantom_cases: Path,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = subprocess.run([*EVALUATE, "--cases", str(phantom_cases),
                             "--out", str(out), "--set", "sweep.min_score=0"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pipeline"]["frames"] == 2 * 6 * 12 and summary["pipeline"]["dropped"] == 0
    for key in ("score", "wfss", "nae", "dsc_soft", "f1"):
        assert summary[key] is not None
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert len(rows) == 2
    events = read_journal(out / "run")
    for row in rows:
        case = row["case_id"]
        frame = json.loads((out / "predictions" / case / "fetal-abdomen-frame-number.json").read_text())
        assert int(row["frame"]) == frame
        # The chosen frame is the final best frame with the highest score among the case's sweeps.
        finals = [e for e in events if e["type"] == "best_frame" and e["final"] and e["source"]
                  and e["source"]["case"] == case]
        assert frame == max(finals, key=lambda e: e["score"])["source"]["case_frame"]
        quality = json.loads((out / "predictions" / case / "frame-quality.json").read_text())
        assert len(quality) == 72 and set(quality) <= {0, 1}
    assert len(list((out / "curves").glob("*.png"))) == 12


def test_evaluation_mode_refuses_a_used_output_folder(phantom_cases: Path, tmp_path: Path) -> None:
    (tmp_path / "eval" / "run").mkdir(parents=True)
    result = subprocess.run([*EVALUATE, "--cases", str(phantom_cases), "--out", str(tmp_path / "eval")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "already exists" in result.stderr.strip().splitlines()[-1]
