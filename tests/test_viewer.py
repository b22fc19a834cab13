"""The live web viewer with the demo running: the page in a real headless browser (Debian's Chromium through
Playwright), `/metrics` against summary.json, the exam summaries of two phantom cases against their truth,
and the token on a non-loopback bind.

One run serves them all: two phantom cases (70 frames a sweep, lossless, as in test_demo), the viewer on a
free port and kept serving the finished run until the test has read its metrics."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, read_journal

from pipeline.exam import EXAM_DISAGREEMENT
from pipeline.phantom import make_cases
from pipeline.viewer import Viewer
from pipeline.viewer.browser import PipelineRun, find_chromium, open_page, preview_latency

# Seed 12: its first case has a sweep the demo picks an optimal frame in at 70 frames a sweep (the exam
# check below needs one; at this frame rate most sweeps' optimal runs are a frame or two).
SEED, CASES, FRAMES = 12, 2, 70
ARTIFACTS = Path(os.environ.get("SWEEPSTREAM_ARTIFACTS", REPO / "runs" / "test-artifacts"))
CHROMIUM = find_chromium()
# The curve restarts with each sweep, so its growth is measured from a base taken in the same sweep; the
# function returns [base, now] once the curve has grown by more than 5 points.
CURVE_GROWN_IN_ONE_SWEEP = """() => {
  const sweep = document.getElementById('curve-sweep').textContent;
  const points = Number(document.getElementById('curve-points').textContent);
  const base = window.curveBase;
  if (!base || base.sweep !== sweep) { window.curveBase = {sweep, points}; return false; }
  return points > base.points + 5 && [base.points, points];
}"""
# The text of the first card whose annotated picture has loaded and whose sweep was measured.
MEASURED_CARD = """() => {
  const card = [...document.querySelectorAll('.card')].find(c => {
    const img = c.querySelector('img.annotated');
    return img && img.complete && img.naturalWidth > 0 && /GA \\d+w/.test(c.innerText);
  });
  return card ? card.innerText : false;
}"""
pytestmark = pytest.mark.timeout(600)  # one pipeline run with a browser serves the module
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (.ci/run installs it: "
                                   "apt-get install chromium)")


def _wait(page, script: str, timeout_s: float = 90) -> None:
    page.wait_for_function(script, timeout=timeout_s * 1000)


def _text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


@pytest.fixture(scope="module")
def viewed_run(tmp_path_factory: pytest.TempPathFactory):
    """The demo on two phantom cases with the page open; yields what the page showed, then the run."""
    pytest.importorskip("playwright", reason="playwright drives the browser (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no system Chromium (.ci/run installs it: apt-get install chromium)")
    out = tmp_path_factory.mktemp("viewer") / "run"
    run = PipelineRun(["--source", f"phantom://{SEED}?cases={CASES}&frames={FRAMES}", "--out", str(out),
                       "--events", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
                       "--set", "transport.policy=lossless", "--set", "run.viewer=127.0.0.1:0",
                       "--set", "run.viewer_linger=120", "--set", "run.health_interval=2"])
    seen: dict = {}
    try:
        url = run.url()
        with open_page(url, CHROMIUM) as page:
            _wait(page, "Number(document.getElementById('preview-count').textContent) >= 3")
            grown = page.wait_for_function(CURVE_GROWN_IN_ONE_SWEEP, timeout=90_000)
            seen["curve"] = tuple(grown.json_value())
            _wait(page, "document.getElementById('health-fps').textContent !== '-'")
            seen["health"] = {name: _text(page, f"#health-{name}") for name in ("fps", "e2e", "frames")}
            # A card appears with its best frame; its biometry follows, and not every sweep is measured.
            card = page.wait_for_function(MEASURED_CARD, timeout=120_000)
            seen["card"] = card.json_value()
            late = page.context.browser.new_page()  # a page that connects late is sent the current state
            late.goto(url)
            _wait(late, "document.querySelectorAll('.card img.annotated').length >= 1"
                        " && Number(document.getElementById('curve-points').textContent) > 0", timeout_s=15)
            seen["late_cards"] = late.locator(".card img.annotated").count()
            late.close()
            # Operator buttons in the last sweeps of the second case, so the first case keeps its sweeps.
            _wait(page, "Number((document.getElementById('sweep-state').textContent.match(/sweep (\\d+)/)"
                        " || [0, -1])[1]) >= 10", timeout_s=120)
            page.click("#stop")
            _wait(page, "document.getElementById('sweep-state').dataset.state === 'ended'"
                        " && document.getElementById('sweep-state').textContent.includes('operator')")
            seen["stopped"] = _text(page, "#sweep-state")
            page.click("#start")
            _wait(page, "document.getElementById('sweep-state').dataset.state === 'open'"
                        " && document.getElementById('sweep-state').textContent.includes('operator')")
            seen["started"] = _text(page, "#sweep-state")
            run.wait_for_line(re.compile(r"^viewer: serving the finished run"), timeout_s=180)
            _wait(page, "document.querySelectorAll('.exam').length >= 2", timeout_s=30)
            seen["exams"] = [page.locator(".exam").nth(i).inner_text() for i in range(2)]
            seen["preview_latency_ms"] = preview_latency(page)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "viewer.png"), full_page=True)
            (ARTIFACTS / "viewer.json").write_text(json.dumps(seen, indent=2))
        with urllib.request.urlopen(url + "metrics", timeout=10) as reply:
            seen["metrics"] = reply.read().decode()
        seen["exit_code"] = run.interrupt()
        seen["stderr_tail"] = run.lines[-30:]
    finally:
        run.close()
    yield out, seen


@needs_browser
def test_the_page_shows_frames_scores_best_frame_cards_and_health(viewed_run) -> None:
    _, seen = viewed_run
    first, later = seen["curve"]
    assert later > first  # the score curve grew while the page watched
    fps_in = float(seen["health"]["fps"].split("/")[0])
    assert fps_in > 0
    assert re.match(r"\d+ / \d+ / \d+", seen["health"]["frames"])
    assert "AC" in seen["card"] and "GA" in seen["card"]
    assert seen["late_cards"] >= 1
    for exam in seen["exams"]:
        assert re.search(r"AC \d+\.\d mm .*GA \d+w \dd from [1-6] of 6 sweeps", exam), exam
    assert seen["preview_latency_ms"]["count"] >= 3
    assert (ARTIFACTS / "viewer.png").stat().st_size > 10_000
    assert seen["exit_code"] == 0, "\n".join(seen["stderr_tail"])


@needs_browser
def test_operator_buttons_end_and_start_a_sweep(viewed_run) -> None:
    out, seen = viewed_run
    stopped = int(re.search(r"sweep (\d+)", seen["stopped"]).group(1))
    started = int(re.search(r"sweep (\d+)", seen["started"]).group(1))
    assert started == stopped + 1
    ended = [e for e in read_journal(out, "sweep_ended") if e["sweep_id"] == stopped]
    assert ended and ended[0]["reason"] == "operator"
    assert any(e["sweep_id"] == started and e["reason"] == "operator"
               for e in read_journal(out, "sweep_started"))


@needs_browser
def test_metrics_parse_as_prometheus_text_and_agree_with_the_summary(viewed_run) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    out, seen = viewed_run
    samples = {}
    for family in text_string_to_metric_families(seen["metrics"]):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    summary = json.loads((out / "summary.json").read_text())
    frames = summary["frames"]
    for name in ("read", "scored", "dropped"):
        assert samples[(f"sweepstream_frames_{name}_total", ())] == frames[name]
    for boundary, counts in frames["boundaries"].items():
        key = (("boundary", boundary),)
        assert samples[("sweepstream_boundary_sent_frames_total", key)] == counts["sent"]
        assert samples[("sweepstream_boundary_dropped_frames_total", key)] == counts["dropped"]
    for segment, stats in summary["latency_ms"].items():
        assert samples[("sweepstream_latency_seconds_count", (("segment", segment),))] == stats["count"]
    events = read_journal(out)
    assert samples[("sweepstream_sweeps_total", ())] == sum(e["type"] == "sweep_started" for e in events)
    finals = [e for e in events if e["type"] == "best_frame" and e["final"] and e["frame_id"] is not None]
    assert samples[("sweepstream_best_frames_total", ())] == len(finals)
    restarts = {dict(labels)["stage"]: value for (name, labels), value in samples.items()
                if name == "sweepstream_restarts_total"}
    assert set(restarts) >= {"capture", "preprocess", "infer", "postprocess"}
    assert sum(restarts.values()) == summary["restarts"]["count"]
    # a phantom and the local engine never reconnect
    assert samples[("sweepstream_reconnects_total", ())] == 0
    assert samples[("sweepstream_engine_reconnects_total", ())] == 0


@needs_browser
def test_annotated_best_frames_are_saved_beside_each_final(viewed_run) -> None:
    out, _ = viewed_run
    finals = [e for e in read_journal(out, "best_frame") if e["final"] and e["frame_id"] is not None]
    assert finals
    for final in finals:
        path = out / final["annotated_png"]
        assert re.fullmatch(r"best/sweep-\d{4}-frame-\d{6}-annotated\.png", final["annotated_png"])
        picture, frame = cv2.imread(str(path)), cv2.imread(str(out / final["frame_png"]))
        assert picture.ndim == 3 and picture.shape[0] > 100
        assert picture.shape[1] <= frame.shape[1]  # cropped to the sector, never wider than the frame


@needs_browser
def test_exam_summary_of_each_phantom_case_agrees_with_its_reference(viewed_run) -> None:
    out, _ = viewed_run
    events = read_journal(out)
    label = {e["frame_id"]: e["source"]["gt_label"] for e in events if e["type"] == "frame"}
    truth = {case.uid: case.fetus.ac_mm for case in make_cases(SEED, CASES, FRAMES)}
    exams = [e for e in events if e["type"] == "exam_summary"]
    assert [e["exam"] for e in exams] == [1, 2]
    assert [e["case"] for e in exams] == list(truth)
    assert exams[0]["reason"] == "case_changed" and exams[1]["reason"] == "end_of_stream"
    checked = 0
    for exam in exams:
        assert exam["rule"] == "confidence_weighted_median"
        assert (out / exam["annotated_png"]).is_file()
        used = [s for s in exam["sweeps"] if s["sweep_id"] in exam["used_sweeps"]]
        if used and all(label[s["frame_id"]] == 1 for s in used):
            assert abs(exam["ac_mm"] - truth[exam["case"]]) <= EXAM_DISAGREEMENT * truth[exam["case"]]
            assert "sweeps_disagree" not in exam["flags"]
            checked += 1
    assert checked >= 1, "no exam whose sweeps' picks were all optimal"


def test_a_non_loopback_bind_needs_the_token_on_every_request(tmp_path: Path) -> None:
    viewer = Viewer("0.0.0.0", 0, tmp_path)
    viewer.start()
    try:
        base = f"http://127.0.0.1:{viewer.port}"
        assert viewer.token and viewer.url.endswith(f"?token={viewer.token}")
        for path in ("/", "/metrics", "/ws", "/static/viewer.js"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path, timeout=5)
            assert refused.value.code == 401
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"{base}{path}?token=wrong{viewer.token}", timeout=5)
        with urllib.request.urlopen(f"{base}/metrics?token={viewer.token}", timeout=5) as reply:
            assert reply.status == 200
        request = urllib.request.Request(base + "/", headers={"Authorization": f"Bearer {viewer.token}"})
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert b"sweepstream" in reply.read()
    finally:
        viewer.close()


def test_a_loopback_bind_needs_no_token(tmp_path: Path) -> None:
    viewer = Viewer("127.0.0.1", 0, tmp_path)
    viewer.start()
    try:
        assert viewer.token is None
        with urllib.request.urlopen(viewer.url + "metrics", timeout=5) as reply:
            assert b"sweepstream_sweeps_total" in reply.read()
    finally:
        viewer.close()


def test_prometheus_buckets_count_what_the_histogram_holds() -> None:
    from pipeline.metrics import LatencyHistogram
    from pipeline.prometheus import BUCKETS_S, prometheus_buckets

    hist = LatencyHistogram()
    hist.add(np.array([0.5, 1.5, 3.0, 40.0, 700.0]))
    folded = prometheus_buckets(hist)
    expected = {0.001: 1, 0.002: 2, 0.005: 3, 0.01: 3, 0.05: 4, 0.5: 4, 1.0: 5, 30.0: 5}
    for bound, count in expected.items():
        assert folded.cumulative[BUCKETS_S.index(bound)] == count
    assert folded.count == 5 and folded.sum_s == pytest.approx(0.745)


def test_a_page_that_connects_late_is_sent_the_current_state() -> None:
    from pipeline.viewer.state import ViewerState

    state = ViewerState()
    events = [{"type": "sweep_started", "sweep_id": 0, "reason": "source", "case": "A", "frame_id": 0},
              *({"type": "frame", "sweep_id": 0, "frame_id": i, "score": i / 10} for i in range(5)),
              {"type": "best_frame", "sweep_id": 0, "final": False, "frame_id": 4, "raw_score": 0.4},
              {"type": "best_frame", "sweep_id": 0, "final": True, "frame_id": 4, "raw_score": 0.4,
               "annotated_png": "best/sweep-0000-frame-000004-annotated.png"},
              {"type": "biometry", "sweep_id": 0, "final": True, "status": "ok", "unit": "mm",
               "ac_mm": 250.0, "ga_weeks": 29.0, "confidence": 0.9},
              {"type": "sweep_ended", "sweep_id": 0, "reason": "source", "frame_count": 5},
              {"type": "sweep_started", "sweep_id": 1, "reason": "source", "case": "A", "frame_id": 5},
              {"type": "frame", "sweep_id": 1, "frame_id": 5, "score": 0.2},
              {"type": "health", "fps_in": 30.0, "fps_out": 29.5, "frames": {"read": 6},
               "source": {"state": "ok", "reconnects": 2}, "engine": {"state": "ok", "reconnects": 1}}]
    changes = [state.apply(e) for e in events]
    assert changes[1] == {"type": "score", "sweep_id": 0, "frame_id": 0, "score": 0.0}
    snapshot = state.snapshot()
    assert snapshot["sweep"]["sweep_id"] == 1 and snapshot["sweep"]["state"] == "open"
    assert snapshot["curve"] == [[5, 0.2]] and snapshot["best"] is None
    (card,) = snapshot["cards"]
    assert card["annotated_png"].endswith("-annotated.png") and card["biometry"]["ac_mm"] == 250.0
    assert snapshot["health"]["fps_in"] == 30.0
    # the page's reconnects: the source's and the engine's, as health carries them
    assert snapshot["health"]["source"]["reconnects"] == 2 and snapshot["health"]["engine"]["reconnects"] == 1


def test_a_bad_viewer_address_is_one_clear_error(tmp_path: Path) -> None:
    import socket

    from pipeline.config import ConfigError, load_config
    from pipeline.viewer import open_viewer

    with pytest.raises(ConfigError, match=r"run\.viewer: 'localhost' is not HOST:PORT"):
        load_config(overrides={"run.viewer": "localhost"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = load_config(overrides={"run.viewer": f"127.0.0.1:{taken.getsockname()[1]}"})
        with pytest.raises(ConfigError, match=r"run\.viewer: cannot serve on 127\.0\.0\.1:\d+"):
            open_viewer(config, tmp_path)
    assert open_viewer(load_config(overrides={"run.viewer": "none"}), tmp_path) is None
