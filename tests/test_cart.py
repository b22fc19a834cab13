"""CPU carts: batching and threads follow the device and the model's measured cost, and the engine's rate
can be capped. Real engines, real processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_pipeline

from engines.bundle import load_bundle
from engines.export.reference import make_reference_bundle
from pipeline.config import REFERENCE_BUNDLE, load_config
from pipeline.steps import NOMINAL_PERIOD_S, SLOW_MODEL_PERIODS, frame_cost_s, load_engine

CORES = len(os.sched_getaffinity(0))


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize(("engine", "batch"), [("ort", 1), ("null", 8)])
def test_auto_batch_follows_the_device(engine: str, batch: int, tmp_path: Path) -> None:
    """On a CPU a batch of N costs N inferences, so auto takes one frame at a time; the null engine
    computes nothing, so batches are free."""
    out = tmp_path / "run"
    result = run_pipeline("--source", "synthetic://320x240?frames=30", "--flood", "--bundle",
                          str(REFERENCE_BUNDLE), "--engine", engine, "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    described = _summary(out)["stages"]["infer"]["engine"]
    assert described["max_batch"] == batch
    assert f"batch up to {batch}" in result.stderr


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores to tell one fewer than all from all")
def test_a_slow_model_gets_every_core_and_a_fast_one_leaves_one(tmp_path: Path) -> None:
    config = load_config(overrides={"infer.engine": "ort", "infer.bundle": str(REFERENCE_BUNDLE)})
    fast, reason = load_engine(config.infer, load_bundle(REFERENCE_BUNDLE))
    assert fast.options.threads == CORES - 1 and "thread(s)" in reason
    fast.close()
    probe = load_bundle(make_reference_bundle(tmp_path / "probe", work=20))
    engine, _ = load_engine(config.infer, probe)
    cost = frame_cost_s(engine, probe)
    engine.close()
    slow_work = round(20 * 2 * SLOW_MODEL_PERIODS * NOMINAL_PERIOD_S / cost)  # twice the threshold, here
    slow = load_bundle(make_reference_bundle(tmp_path / "slow", work=slow_work))
    engine, reason = load_engine(config.infer, slow)
    assert engine.options.threads == CORES, reason
    assert f"gets all {CORES} cores" in reason
    engine.close()


def test_rate_limit_caps_the_engine_and_scores_the_newest(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_pipeline("--source", "synthetic://320x240?fps=30&frames=90", "--bundle",
                          str(REFERENCE_BUNDLE), "--out", str(out), "--quiet",
                          "--set", "infer.rate_limit_fps=5")
    assert result.returncode == 0, result.stderr
    summary = _summary(out)
    frames = summary["frames"]
    assert frames["read"] == 90 and frames["balanced"]
    # 3 s of video at 5 frames a second through the engine: about 15 scored, never many more.
    assert frames["scored"] <= 5 * summary["duration_s"] + 2
    assert frames["scored"] >= 5
    # The frames the engine had no time for were replaced by newer ones while waiting, and counted.
    assert frames["boundaries"]["preprocess>infer"]["drops"]["preprocess.drop_held"] > 0


def test_a_negative_rate_limit_is_one_clear_line(tmp_path: Path) -> None:
    result = run_pipeline("--set", "infer.rate_limit_fps=-1", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "infer.rate_limit_fps: -1.0 is below the minimum 0.01" in result.stderr.strip().splitlines()[-1]
