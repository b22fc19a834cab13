"""The engine benchmark runs end to end on a tiny bundle (torch model, gated int8) and writes JSON and PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from engines.benchmark import vit_gflop  # noqa: E402
from engines.export.build_bundle import build_bundle  # noqa: E402
from engines.export.fetalclip import build_model, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "tools" / "bench_engine.py"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """build_bundle on the tiny config, with the torch model and --int8."""
    workdir = tmp_path_factory.mktemp("bench_engine")
    torch.manual_seed(0)
    weights = workdir / "tiny.pt"
    torch.save({"state_dict": build_model(load_config("tiny")).state_dict()}, weights)
    return build_bundle(weights, workdir / "bundle", config="tiny", int8=True).bundle.path


def test_bench_engine_writes_json_and_png(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [
        "--bundle",
        str(tiny_bundle),
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--batches",
        "1,2",
        "--json",
        str(out),
    ]
    result = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    expected = ["torch eager fp32", "ort fp32", "ort int8"]
    cuda = torch.cuda.is_available()
    assert report["order"] == expected + (["torch cuda fp16"] if cuda else [])
    rows = report["rows"]
    assert [(r["backend"], r["batch"]) for r in rows[:6]] == [(b, n) for b in expected for n in (1, 2)]
    assert report["cosine_vs"] == "torch eager fp32"
    by_key = {(r["backend"], r["batch"]): r for r in rows}
    for row in rows:
        assert len(row["times_ms"]) == 2 and row["median_ms"] > 0
        assert row["ms_per_frame"] == pytest.approx(row["median_ms"] / row["batch"])
        assert row["frames_per_s"] == pytest.approx(1e3 * row["batch"] / row["median_ms"])
        torch_ms = by_key[("torch eager fp32", row["batch"])]["median_ms"]
        assert row["speedup_vs_torch_fp32"] == pytest.approx(torch_ms / row["median_ms"])
        assert row["gflop_per_s"] > 0
    assert by_key[("torch eager fp32", 1)]["min_cosine"] == pytest.approx(1.0)
    assert by_key[("ort fp32", 2)]["min_cosine"] > 0.99999
    assert by_key[("ort int8", 2)]["min_cosine"] > 0.999
    assert (
        by_key[("ort int8", 1)]["model"] == "model.int8.onnx"
        and by_key[("ort int8", 1)]["precision"] == "int8"
    )
    assert by_key[("ort fp32", 1)]["model"] == "model.onnx"
    assert by_key[("torch eager fp32", 1)]["precision"] == "fp32"
    assert set(report["target"]["per_batch"]) == {"1", "2"}
    assert report["int8_gate"]["passed"] is True
    # Tiny ViT (width 64, 4 layers, patch 32, 50 tokens): 4 x 5.55 MFLOP blocks + 19.3 MFLOP patch embedding.
    assert report["gflop_per_image"] == pytest.approx(0.0415, abs=1e-4)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x torch" in result.stdout and "target ort int8" in result.stdout


def test_vit_flops_match_the_issue_for_vit_l14() -> None:
    """162 GFLOP per image for FetalCLIP's ViT-L/14 at 224, the figure the issue quotes."""
    assert vit_gflop(load_config("fetalclip"), 224) == pytest.approx(162.0, abs=0.1)
    assert vit_gflop(None, 224) is None


def test_bench_engine_needs_a_bundle(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--bundle", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert (
        result.returncode == 1
        and result.stderr.strip() == f"bench_engine: error: bundle {tmp_path}: bundle.json not found"
    )
