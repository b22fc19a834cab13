"""The watchdog: a stage that dies, hangs or keeps failing is restarted within limits, and the run loses
nothing it published. Real processes, real sockets, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import zmq
from conftest import REPO, read_journal, run_pipeline, run_stream_cmd, stage_pids

from pipeline.events import read_journal as read_torn_journal
from pipeline.recovery import recover


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Recorder:
    """A subscriber recording every event line of the PUB stream, as an outside listener would."""

    def __init__(self, endpoint: str) -> None:
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint,), daemon=True)
        self._thread.start()

    def _run(self, endpoint: str) -> None:
        context = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        while not self._stop.is_set():
            if sub.poll(50):
                _, body = sub.recv_multipart()
                self.lines.append((time.monotonic(), body.decode()))
        sub.close(linger=0)
        context.term()

    def frames_after(self, t: float) -> list[dict]:
        return [json.loads(line) for at, line in self.lines if at > t and '"type":"frame"' in line]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _start(out: Path, events: str, *args: str) -> subprocess.Popen:
    """A looping live phantom run whose events go to a port the test knows (the later --events wins)."""
    return subprocess.Popen(run_stream_cmd("--source", "phantom://11?cases=1&frames=60", "--loop", "--quiet",
                                           "--out", str(out), "--events", events, *args),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(condition, what: str, process: subprocess.Popen, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert process.poll() is None, f"the run ended while waiting for {what}: {process.communicate()[1]}"
        assert time.monotonic() < deadline, f"no {what} within {within:.0f} s"
        time.sleep(0.05)


@pytest.mark.parametrize("stage", ["capture", "preprocess", "infer", "postprocess"])
def test_a_stage_killed_mid_sweep_is_restarted_and_nothing_published_is_lost_or_repeated(
        stage: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    events = f"tcp://127.0.0.1:{_free_port()}"
    recorder = Recorder(events)
    process = _start(out, events)
    try:
        _wait(lambda: len(recorder.frames_after(0)) >= 40, "frame events", process)
        killed_at, killed_wall = time.monotonic(), time.time()
        os.kill(stage_pids(process.pid)[stage], signal.SIGKILL)

        def captured_since_kill() -> list[dict]:
            return [e for e in recorder.frames_after(killed_at) if e["t_capture"] > killed_wall]
        _wait(lambda: captured_since_kill(), "frames captured after the kill", process)
        first = captured_since_kill()[0]
        print(f"{stage}: the first frame captured after the kill was published "
              f"{first['t_event'] - killed_wall:.2f} s after it")
        _wait(lambda: len(recorder.frames_after(killed_at)) >= 30, "a while of frames", process)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        recorder.close()
    assert process.returncode == 0, stderr
    journal = (out / "events.jsonl").read_text().splitlines()
    published = {line for _, line in recorder.lines}
    assert published <= set(journal), "an event published on the socket is missing from the journal"
    assert len(journal) == len(set(journal))
    parsed = [json.loads(line) for line in journal]
    frames = Counter(e["frame_id"] for e in parsed if e["type"] == "frame")
    assert max(frames.values()) == 1, "a frame was published twice"
    for kind in ("sweep_started", "sweep_ended"):
        ids = [e["sweep_id"] for e in parsed if e["type"] == kind]
        assert ids == sorted(set(ids)), f"{kind}: sweep ids repeat or go back: {ids}"
    finals = [e["sweep_id"] for e in parsed if e["type"] == "best_frame" and e["final"]]
    assert len(finals) == len(set(finals))
    restarts = [e for e in parsed if e["type"] == "health" and "restart" in e]
    assert restarts and restarts[0]["restart"]["stage"] == stage
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"]["by_stage"] == {stage: 1}


def test_a_stage_that_stops_answering_is_restarted(tmp_path: Path) -> None:
    out = tmp_path / "run"
    events = f"tcp://127.0.0.1:{_free_port()}"
    recorder = Recorder(events)
    process = _start(out, events, "--set", "run.stall_timeout=2")
    try:
        _wait(lambda: len(recorder.frames_after(0)) >= 20, "frame events", process)
        os.kill(stage_pids(process.pid)["infer"], signal.SIGSTOP)
        _wait(lambda: any('"restart"' in line and "stalled" in line for _, line in recorder.lines),
              "a restart of the stopped stage", process)
        stopped_at = time.monotonic()
        _wait(lambda: len(recorder.frames_after(stopped_at)) >= 10, "frames after the restart", process)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        recorder.close()
    assert process.returncode == 0, stderr
    assert json.loads((out / "summary.json").read_text())["restarts"]["by_stage"] == {"infer": 1}


def test_a_stage_that_keeps_failing_stops_the_run_after_its_restarts_with_one_line(tmp_path: Path) -> None:
    """Capture fails at its first frame every time (a ring slot too small for the frame)."""
    out = tmp_path / "run"
    result = run_pipeline("--source", "synthetic://320x240?frames=30", "--out", str(out), "--quiet",
                          "--set", "ring.slot_mb=0.01", "--set", "run.max_restarts=2",
                          "--set", "run.restart_backoff_s=0")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "stage 'capture' failed" in last and "restarted 2 times" in last and "raise ring.slot_mb" in last
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcome"] == "failed" and summary["restarts"]["by_stage"] == {"capture": 2}


def test_every_journal_reader_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    journal = tmp_path / "events.jsonl"
    whole = [{"type": "sweep_started", "sweep_id": 0, "frame_id": 3, "case": "a", "t": 0.1},
             {"type": "frame", "sweep_id": 0, "frame_id": 3, "score": 0.5, "refined": False,
              "t_capture": 1.0, "source": {"pts": 0.1, "case": "a", "sweep": 0}}]
    journal.write_text("".join(json.dumps(e) + "\n" for e in whole) + '{"type": "fra')
    assert read_torn_journal(journal) == whole
    recovered = recover(read_torn_journal(journal))
    assert recovered.next_sweep_id == 1 and recovered.published == {3} and recovered.open[0].sweep_id == 0
    assert read_journal(tmp_path, "frame") == whole[1:]  # the tests' own reader too
