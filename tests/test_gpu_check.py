"""tools/gpu_check.py (engines/gpu_check.py): where no GPU is, its one line and exit code; its comparison
and report on real ONNX Runtime outputs. On a GPU machine it is the check itself, run by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engines import gpu_check
from engines.base import EngineOptions
from engines.bundle import load_bundle
from engines.onnxruntime import OrtEngine
from engines.registry import nvidia_driver_present
from engines.tensorrt import PARITY

REPO = Path(__file__).resolve().parents[1]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_help() -> None:
    result = run_tool("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: ")
    for text in ("--out", "--skip-vit-l", "--no-bench", "ViT-L/14", "plan cache", "Exit status"):
        assert text in result.stdout


@pytest.mark.skipif(nvidia_driver_present(), reason="this machine has an NVIDIA driver")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path: Path) -> None:
    result = run_tool("--out", str(tmp_path / "report"))
    assert result.returncode == gpu_check.NO_GPU == 3
    assert result.stdout == "" and result.stderr == (
        "gpu_check: no CUDA GPU is usable here: no NVIDIA driver (/proc/driver/nvidia/version is absent); "
        "nothing was checked\n")
    assert not (tmp_path / "report").exists()


@pytest.fixture(scope="module")
def reference_outputs() -> tuple:
    bundle = load_bundle(REPO / "bundles" / "reference")
    engine = OrtEngine(bundle, EngineOptions(device="cpu", precision="fp32", max_batch=gpu_check.FRAMES))
    engine.load()
    outputs = engine.infer(gpu_check.sample_batch(bundle))
    engine.close()
    return bundle, outputs


def test_compare_holds_each_precision_to_its_parity(reference_outputs: tuple) -> None:
    bundle, want = reference_outputs
    figures, misses = gpu_check.compare(bundle, want, want, "fp32")
    assert misses == [] and figures == {"quality_max_abs_diff": 0.0, "mask_agreement": 1.0,
                                        "planes_max_abs_diff": 0.0}
    nudged = {**want, "quality": want["quality"] + 5e-3}  # an fp16-sized error
    assert gpu_check.compare(bundle, nudged, want, "fp16")[1] == []
    _, misses = gpu_check.compare(bundle, nudged, want, "fp32")
    assert misses == [f"quality_max_abs_diff {5e-3:.6g} (needs <= {PARITY['fp32'].score_atol})"]
    flipped = {**want, "mask": 1 - want["mask"]}
    assert gpu_check.compare(bundle, flipped, want, "fp16")[1][0].startswith("mask_agreement 0 ")


def test_report_pages(tmp_path: Path) -> None:
    """The JSON and Markdown written after every step, with the verdict counting failed checks."""
    report = {
        "backends": {"torch": (True, "torch 2.x"), "trt": (False, "tensorrt is not installed")},
        "checks": [
            {"bundle": "reference-intensity", "backend": "torch", "precision": "fp16", "load_s": 1.0,
             "parity": {"quality_max_abs_diff": 1e-3}, "latency_ms": {"1": 0.5, "8": 0.9},
             "passed": True, "failures": []},
            {"bundle": "reference-intensity", "backend": "trt", "precision": "fp32", "passed": False,
             "failures": ["EngineError: could not parse"]},
        ],
        "bench_gpu_rows": [], "failures": [], "notes": [], "finished": True,
    }
    gpu_check.write(report, tmp_path)
    assert report["failed"] == 1 and report["verdict"] == "2 checks, 1 failed"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["failed"] == 1
    page = (tmp_path / "gpu_check.md").read_text()
    assert "- trt: no, tensorrt is not installed" in page
    row = "| reference-intensity | torch | fp16 | 1.0 | quality_max_abs_diff 0.001 | 0.50 / 0.90 | - | pass |"
    assert row in page and "| FAIL: EngineError: could not parse |" in page


class CpuStandIn(OrtEngine):
    """LABELLED FAKE: ONNX Runtime on the CPU standing in for a GPU engine (none can run here), reporting a
    plan cache as the trt engine does: built on the first load, hit on the next."""

    loads = 0

    def describe(self) -> dict:
        CpuStandIn.loads += 1
        return {**super().describe(), "cache": "built" if CpuStandIn.loads == 1 else "hit"}


def test_check_runs_every_case_and_writes_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LABELLED FAKE (CpuStandIn for the trt engine): the whole flow on the reference bundle, both precisions,
    the second load and the report; the stand-in's fp32 outputs equal ORT's, so every check passes."""
    monkeypatch.setattr(gpu_check, "open_engine", lambda bundle, backend, precision, cache: CpuStandIn(
        bundle, EngineOptions(device="cpu", precision="fp32", max_batch=gpu_check.FRAMES)))
    monkeypatch.setattr(CpuStandIn, "loads", 0)
    report = gpu_check.check(tmp_path, vit_l=False, bench=False, backends={"trt": (True, "LABELLED FAKE")})
    assert report["finished"] and report["failed"] == 0
    cases = [(row["backend"], row["precision"]) for row in report["checks"]]
    assert cases == [("trt", "fp16"), ("trt", "fp32")]
    first = report["checks"][0]
    assert first["second_load"]["same_outputs"] and set(first["latency_ms"]) == {"1", "8"}
    assert first["parity"]["mask_agreement"] == 1.0
    assert report["checks"][1]["failures"] == []
    page = (tmp_path / "gpu_check.md").read_text()
    assert "- 2 checks, 0 failed" in page and page.count("| pass |") == 2
