"""The kserve engine against real KServe v2 servers on loopback (tools/serve_bundle.py: kserve's ModelServer
around the ORT engine, started here), the pipeline run as users run it, and the Triton repository checked
against Triton's config schema (the protobuf definitions tritonclient ships)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, read_journal, run_pipeline, run_stream_cmd

pytest.importorskip("tritonclient.grpc")
if importlib.util.find_spec("kserve") is None:  # not imported here: its protos clash with tritonclient's
    pytest.skip("kserve is not installed (tools/serve_bundle.py needs it)", allow_module_level=True)

from engines.base import EngineError, EngineOptions, EngineTimeout  # noqa: E402
from engines.bundle import load_bundle  # noqa: E402
from engines.export.triton import TRITON_TYPES, TritonExportError, parse_config, write_repository  # noqa: E402
from engines.kserve import RETRY_S, KserveEngine, KserveOptions  # noqa: E402
from engines.onnxruntime import OrtEngine  # noqa: E402
from engines.registry import select_engine  # noqa: E402
from engines.serve import free_port, serving, start_server, stop_server, wait_ready  # noqa: E402
from pipeline.config import ConfigError, load_config  # noqa: E402

DEMO = REPO / "bundles" / "demo"
REFERENCE = REPO / "bundles" / "reference"
# A short lossless flooded source: every frame is scored, whatever the engine's speed, so two runs score
# the same frames.
SAME_FRAMES = ("--source", "phantom://7?cases=1&frames=8", "--set", "source.flood=true",
               "--set", "transport.policy=lossless", "--quiet")
SCORE_ATOL = 1e-5  # the same fp32 ONNX in the same ONNX Runtime: equal but for summation order


@pytest.fixture(scope="module")
def demo_server() -> Iterator[tuple[int, int]]:
    with serving(DEMO, precision="fp32") as (_, grpc_port, http_port):
        yield grpc_port, http_port


@pytest.fixture(scope="module")
def reference_server() -> Iterator[tuple[int, int]]:
    with serving(REFERENCE) as (_, grpc_port, http_port):
        yield grpc_port, http_port


def _frames(out: Path) -> dict[int, dict]:
    return {event["frame_id"]: event for event in read_journal(out, "frame")}


def _run(out: Path, *args: str) -> dict[int, dict]:
    result = run_pipeline("--bundle", str(DEMO), *SAME_FRAMES, "--out", str(out), *args, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"]["balanced"] and summary["frames"]["dropped"] == 0
    return _frames(out)


@pytest.fixture(scope="module")
def ort_frames(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    return _run(tmp_path_factory.mktemp("ort") / "run", "--engine", "ort", "--set", "infer.precision=fp32")


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_pipeline_through_kserve_scores_as_local_ort(scheme: str, demo_server: tuple[int, int],
                                                    ort_frames: dict[int, dict], tmp_path: Path) -> None:
    port = demo_server[0] if scheme == "grpc" else demo_server[1]
    remote = _run(tmp_path / "run", "--engine", "kserve", "--set", f"infer.kserve_url={scheme}://127.0.0.1:{port}",
                  "--set", "infer.kserve_model=demo")
    assert sorted(remote) == sorted(ort_frames) and len(remote) == 48
    for frame_id, local in ort_frames.items():
        theirs = remote[frame_id]
        assert abs(theirs["score"] - local["score"]) <= SCORE_ATOL
        assert theirs["heads"]["mask"] == pytest.approx(local["heads"]["mask"], abs=SCORE_ATOL)
        for name, p in local["heads"]["planes"].items():
            assert abs(theirs["heads"]["planes"][name] - p) <= SCORE_ATOL
        assert set(theirs) == set(local)


def test_engine_outputs_match_ort_by_name(demo_server: tuple[int, int]) -> None:
    bundle = load_bundle(DEMO)
    frames = np.random.default_rng(3).integers(0, 256, (3, 224, 224), dtype=np.uint8)
    local = OrtEngine(bundle, EngineOptions(threads=1, max_batch=4, precision="fp32"))
    local.load()
    expected = local.infer(frames)
    for url in (f"grpc://127.0.0.1:{demo_server[0]}", f"http://127.0.0.1:{demo_server[1]}"):
        engine = KserveEngine(bundle, EngineOptions(max_batch=4), KserveOptions(url=url))
        engine.load()
        try:
            got = engine.infer(frames)
        finally:
            engine.close()
        assert set(got) == set(bundle.outputs)
        for name, spec in bundle.outputs.items():
            assert got[name].dtype == spec.dtype and got[name].shape == (3, *spec.shape)
            np.testing.assert_allclose(got[name].astype(np.float64), expected[name].astype(np.float64),
                                       atol=SCORE_ATOL)


def test_metadata_mismatch_is_refused_before_start(reference_server: tuple[int, int], tmp_path: Path) -> None:
    """The demo bundle against a server of the reference model: its outputs lack the demo's embedding."""
    out = tmp_path / "run"
    result = run_pipeline("--bundle", str(DEMO), *SAME_FRAMES, "--out", str(out), "--engine", "kserve",
                          "--set", f"infer.kserve_url=grpc://127.0.0.1:{reference_server[0]}",
                          "--set", "infer.kserve_model=reference-intensity")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "kserve model 'reference-intensity'" in lines[0] and "output 'embedding' is missing" in lines[0]
    assert not out.exists()  # refused before the run folder, let alone a stage


def test_unknown_model_and_dead_server_are_one_line(reference_server: tuple[int, int],
                                                    tmp_path: Path) -> None:
    dead = free_port()
    for url, model, says in ((f"grpc://127.0.0.1:{reference_server[0]}", "nope", "nope"),
                             (f"http://127.0.0.1:{dead}", "reference-intensity", "does not answer")):
        result = run_pipeline(*SAME_FRAMES, "--out", str(tmp_path / "run"), "--engine", "kserve",
                              "--set", f"infer.kserve_url={url}", "--set", f"infer.kserve_model={model}")
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr, result.stderr


def _wait_for(what: str, condition, timeout_s: float, process: subprocess.Popen) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.1)


def _journal(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_server_killed_mid_run_drops_counts_and_recovers(tmp_path: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    server = start_server(REFERENCE, grpc_port, http_port)
    run = None
    try:
        wait_ready(f"grpc://127.0.0.1:{grpc_port}", "reference-intensity", 120, server)
        out = tmp_path / "run"
        run = subprocess.Popen(
            run_stream_cmd("--source", "phantom://7?cases=1&frames=40", "--set", "source.loop=true",
                           "--set", "source.duration=200", "--engine", "kserve",
                           "--set", f"infer.kserve_url=grpc://127.0.0.1:{grpc_port}",
                           "--set", "infer.kserve_model=reference-intensity",
                           "--set", "run.health_interval=0.5", "--quiet", "--out", str(out)),
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for("scored frame", lambda: any(e["type"] == "frame" for e in _journal(out)), 120, run)
        server.kill()  # a crash, not a clean stop
        server.wait()

        def last_health() -> dict:
            health = [e for e in _journal(out) if e["type"] == "health" and "drop_causes" in e]
            return health[-1] if health else {"drop_causes": {}, "engine": {"state": "ok", "reconnects": 0}}
        _wait_for("frames dropped while the server is gone",
                  lambda: last_health()["drop_causes"].get("infer.drop_engine_timeout", 0) >= 5, 60, run)
        _wait_for("health saying the engine lost its server",
                  lambda: last_health()["engine"]["state"] == "unreachable", 30, run)
        server = start_server(REFERENCE, grpc_port, http_port)
        wait_ready(f"grpc://127.0.0.1:{grpc_port}", "reference-intensity", 120, server)
        back = time.time()
        def scored_since_back() -> int:
            return sum(e["type"] == "frame" and e["t_event"] > back + 0.5 for e in _journal(out))
        _wait_for("frames scored after the server came back", lambda: scored_since_back() >= 10, 60, run)
        _wait_for("health saying the engine is back",
                  lambda: last_health()["engine"]["state"] == "ok", 30, run)
        assert last_health()["engine"]["reconnects"] >= 1
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
        assert run.returncode == 0, stderr
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait()
        stop_server(server)
    summary = json.loads((out / "summary.json").read_text())
    frames = summary["frames"]
    dropped = frames["boundaries"]["preprocess>infer"]["drops"]["infer.drop_engine_timeout"]
    assert dropped >= 5 and frames["balanced"]
    assert summary["stages"]["infer"]["counters"]["drop_engine_timeout"] == dropped
    assert "answers again" in stderr


def test_timeout_is_counted_and_the_engine_stays_usable(reference_server: tuple[int, int]) -> None:
    """A server that cannot answer within the timeout: EngineTimeout, the next calls back off, and once the
    timeout is one the server can meet again, the same engine answers."""
    bundle = load_bundle(REFERENCE)
    engine = KserveEngine(bundle, EngineOptions(max_batch=32),
                          KserveOptions(url=f"grpc://127.0.0.1:{reference_server[0]}", timeout_s=0.01))
    engine.load()
    big = np.zeros((32, 224, 224), np.uint8)
    try:
        with pytest.raises(EngineTimeout):
            for _ in range(20):  # 32 frames in 10 ms: not on this machine, at least once in 20
                engine.infer(big)
        with pytest.raises(EngineTimeout, match="server down, next try"):
            engine.infer(big[:1])
        engine.timeout_s = 30.0
        time.sleep(RETRY_S[0] + 0.05)  # the first back-off over
        assert engine.infer(big[:2])["quality"].shape == (2,)
        assert engine.timeouts >= 2 and engine.reconnects >= 1
    finally:
        engine.close()


# --------------------------------------------------------------------------- options and selection


def test_issue_keys_set_the_kserve_options() -> None:
    config = load_config(overrides={"infer.engine": "kserve", "infer.kserve_url": "grpc://127.0.0.1:8001",
                                    "infer.kserve_model": "demo", "infer.kserve.timeout_s": "2.5"})
    assert config.infer.backends["kserve"] == KserveOptions(url="grpc://127.0.0.1:8001", model="demo",
                                                            timeout_s=2.5)
    with pytest.raises(ConfigError, match="infer.kserve.timeout_s: 0.0 is below"):
        load_config(overrides={"infer.kserve_timeout_s": "0"})


def test_auto_never_picks_kserve() -> None:
    bundle = load_bundle(REFERENCE)
    options = EngineOptions(device="cpu")
    engine, reason = select_engine("auto", bundle, options,
                                   {"kserve": KserveOptions(url="grpc://127.0.0.1:8001")})
    assert engine.type_key != "kserve" and "kserve" not in reason


@pytest.mark.parametrize(("url", "precision", "says"), [
    (None, "auto", "needs the server's address"),
    ("tcp://127.0.0.1:8001", "auto", "is not SCHEME://HOST:PORT"),
    ("grpc://127.0.0.1", "auto", "is not SCHEME://HOST:PORT"),
    ("grpc://127.0.0.1:8001", "int8", "the server decides"),
])
def test_bad_options_are_refused(url: str | None, precision: str, says: str) -> None:
    with pytest.raises(EngineError, match=says):
        KserveEngine(load_bundle(REFERENCE), EngineOptions(precision=precision), KserveOptions(url=url))


def test_bad_url_is_one_line_before_start(tmp_path: Path) -> None:
    result = run_pipeline(*SAME_FRAMES, "--out", str(tmp_path / "run"), "--engine", "kserve",
                          "--set", "infer.kserve_url=127.0.0.1:8001")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "infer.kserve.url '127.0.0.1:8001'" in result.stderr


# --------------------------------------------------------------------------- Triton model repository


@pytest.mark.parametrize("bundle_dir", [DEMO, REFERENCE])
def test_triton_repository_parses_against_the_schema(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    folder = write_repository(bundle, tmp_path / "models")
    config = parse_config((folder / "config.pbtxt").read_text())
    assert config.name == bundle.name and config.backend == "onnxruntime"
    assert config.max_batch_size == bundle.max_batch
    assert config.HasField("dynamic_batching") and config.instance_group[0].count == 1
    assert (folder / "1" / config.default_model_filename).read_bytes() == bundle.model_path.read_bytes()
    from tritonclient.grpc import model_config_pb2 as pb

    (tensor,) = config.input
    assert tensor.name == bundle.input.name and list(tensor.dims) == list(bundle.input.frame_shape)
    assert pb.DataType.Name(tensor.data_type) == TRITON_TYPES[bundle.input.dtype]
    outputs = {out.name: out for out in config.output}
    assert set(outputs) == set(bundle.outputs)
    for name, spec in bundle.outputs.items():
        out = outputs[name]
        assert pb.DataType.Name(out.data_type) == TRITON_TYPES[spec.dtype]
        shape = list(out.reshape.shape) if out.HasField("reshape") else list(out.dims)
        assert shape == list(spec.shape)


def test_triton_schema_check_is_strict(tmp_path: Path) -> None:
    from google.protobuf.text_format import ParseError

    folder = write_repository(load_bundle(REFERENCE), tmp_path / "models")
    text = (folder / "config.pbtxt").read_text()
    with pytest.raises(ParseError, match="max_batch"):
        parse_config(text.replace("max_batch_size", "max_batch"))
    with pytest.raises(TritonExportError, match="runs on CPU instances only"):
        write_repository(load_bundle(DEMO), tmp_path / "int8", precision="int8")
    with pytest.raises(TritonExportError, match="needs --plan"):
        write_repository(load_bundle(DEMO), tmp_path / "trt", backend="tensorrt")


@pytest.mark.skipif("SWEEPSTREAM_TRITON_URL" not in os.environ,
                    reason="no Triton server reachable (a Triton server cannot run in this workplace); set "
                           "SWEEPSTREAM_TRITON_URL=grpc://HOST:PORT to a Triton serving "
                           "tools/export_triton.py's repository of bundles/demo")
def test_live_triton_scores_as_local_ort() -> None:
    bundle = load_bundle(DEMO)
    frames = np.random.default_rng(5).integers(0, 256, (2, 224, 224), dtype=np.uint8)
    local = OrtEngine(bundle, EngineOptions(threads=1, max_batch=2, precision="fp32"))
    local.load()
    engine = KserveEngine(bundle, EngineOptions(max_batch=2),
                          KserveOptions(url=os.environ["SWEEPSTREAM_TRITON_URL"], timeout_s=10))
    engine.load()
    try:
        got, expected = engine.infer(frames), local.infer(frames)
    finally:
        engine.close()
    for name in bundle.outputs:
        np.testing.assert_allclose(got[name].astype(np.float64), expected[name].astype(np.float64), atol=1e-4)


def test_bench_kserve_prints_and_writes_the_three_engines(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "tools" / "bench_kserve.py"), "--bundle", str(REFERENCE),
               "--batches", "1,2", "--rounds", "2", "--warmup", "1", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    engines = ["ort fp32 (local)", "kserve grpc", "kserve http"]
    assert [(row["engine"], row["batch"]) for row in rows] == [(e, n) for n in (1, 2) for e in engines]
    for row in rows:
        assert len(row["ms_per_frame"]) == 2 and row["max_abs_diff_vs_local"] <= SCORE_ATOL
        assert row["engine"] in result.stdout
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_latency_streams_share_one_kserve_server(tmp_path: Path) -> None:
    """--streams 2 --share kserve: two runs at once, both scored by one KServe v2 server (its process is
    sampled, no local infer stage scores), every frame of both scored (lossless)."""
    out = tmp_path / "streams.json"
    command = [sys.executable, str(REPO / "tools" / "bench_latency.py"), "--no-pattern", "--source",
               "phantom://3?cases=1&frames=20", "--frames", "30", "--modes", "flood", "--engine", "ort",
               "--threads", "1", "--policy", "lossless", "--streams", "2", "--share", "kserve", "--skip", "2",
               "--pixel-format", "gray", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["streams"]["share"] == "kserve" and entry["streams"]["fairness_p99"] >= 1.0
    assert [s["scored"] for s in entry["streams"]["per_stream"]] == [30, 30]
    assert "kserve-server" in entry["processes"]
