"""Live sources on real streams: an ffmpeg process streams MPEG-TS over UDP on loopback, the source reads it
through its newest-frame reader, and keeps reading after ffmpeg is killed and started again (reconnect
counted, the run not ended). Also video files in three containers, the newest-frame reader on a real
file-backed capture, and the V4L2 options (no device node exists here)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import REPO, run_stream_cmd

from pipeline.capture_bench import EncoderStream, free_udp_port
from pipeline.sources import SourceError, check_uri, open_source
from pipeline.sources.live import av_frames
from pipeline.sources.reader import NewestFrameReader
from pipeline.sources.stream import stream_options
from pipeline.sources.v4l2 import V4l2Spec, parse_v4l2

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command (.ci/run)")
WAIT_S = 30.0  # generous: the machine is shared and may be slow; no figure depends on it


@pytest.fixture
def stream():
    encoder = EncoderStream(free_udp_port())
    encoder.start()
    yield encoder
    encoder.kill()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_udp_stream_is_read_newest_first_and_reconnects_after_the_encoder_restarts(stream) -> None:
    source = open_source(stream.url, "gray")
    try:
        assert source.live and source.describe()["codec"] == "h264"
        assert (source.describe()["width"], source.describe()["height"]) == (320, 240)
        before = []
        wait_for(lambda: (frame := source.read()) is not None and before.append(frame) is None
                 and len(before) >= 10, "frames")
        pairs = zip(before, before[1:], strict=False)
        assert all(a.t_arrival < b.t_arrival and a.index < b.index for a, b in pairs)
        stream.kill()
        wait_for(lambda: source.read() is None and source.reader.reconnecting, "the loss to be noticed")
        assert not source.ended  # a live stream that blinked is not over
        restarted = time.monotonic_ns()
        stream.start()
        after = []
        wait_for(lambda: (frame := source.read()) is not None and after.append(frame) is None
                 and len(after) >= 5, "frames after the restart")
        assert all(frame.t_arrival > restarted for frame in after)
        assert source.health()["reconnects"] == 1 and source.health()["reconnected"] == 1
        assert after[0].index > before[-1].index and not source.reader.reconnecting
        assert source.reader.outage_s > 0
    finally:
        source.close()


def test_pipeline_on_a_udp_stream_survives_an_encoder_restart(stream, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = run_stream_cmd("--source", stream.url, "--out", str(out), "--quiet", "--duration", "12",
                             "--set", "run.health_interval=0.3", "--set", "preprocess.roi=none")
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = out / "events.jsonl"

    def health() -> list[dict]:
        if not journal.exists():
            return []
        lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        return [event for event in lines if event["type"] == "health"]
    try:
        wait_for(lambda: any(h["frames"]["read"] > 10 for h in health()), "frames through the pipeline")
        stream.kill()
        wait_for(lambda: any(h["source"]["state"] == "reconnecting" for h in health()), "reconnecting")
        stream.start()
        wait_for(lambda: any(h["source"]["reconnects"] == 1 and h["source"]["state"] == "ok"
                             for h in health()), "the reconnection")
        _, stderr = run.communicate(timeout=WAIT_S + 12)
    finally:
        run.kill()
    assert run.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcome"] == "completed"  # ran to its duration: the blink did not end it
    events = health()
    lost = next(i for i, h in enumerate(events) if h["source"]["state"] == "reconnecting")
    assert events[-1]["frames"]["read"] > events[lost]["frames"]["read"]  # frames came again
    assert summary["frames"]["balanced"]


def write_video(path: Path, codec: str, frames: int = 12, pix_fmt: str = "yuv420p") -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 160, 96, pix_fmt
        for i in range(frames):
            image = np.full((96, 160, 3), 40, np.uint8)
            image[:, 10 * i:10 * i + 10] = 220
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize(("name", "codec"), [("clip.mp4", "libx264"), ("clip.mkv", "ffv1"),
                                             ("clip.avi", "mpeg4")])
def test_video_files_in_common_containers(tmp_path: Path, name: str, codec: str) -> None:
    path = write_video(tmp_path / name, codec)
    source = open_source(str(path), "gray")
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    assert len(frames) == 12 and frames[0].image.shape == (96, 160)
    assert [int(np.argmax(f.image[48])) // 10 for f in frames] == list(range(12))  # in order, none lost
    described = source.describe()
    assert described["fps"] == pytest.approx(25) and (described["width"], described["height"]) == (160, 96)
    source.close()


def test_newest_frame_reader_on_a_file_backed_capture(tmp_path: Path) -> None:
    """A real capture read faster than it is taken: older frames are replaced, never queued, and every
    frame is either taken or counted as replaced."""
    path = write_video(tmp_path / "capture.mkv", "ffv1", frames=60)

    def opener():
        container = av.open(str(path))
        return container, av_frames(container, "gray")
    reader = NewestFrameReader(str(path), opener, reconnect=False)
    reader.start()
    taken = []
    while (frame := reader.take(1.0)) is not None or not reader.ended:
        if frame is not None:
            taken.append(frame)
            time.sleep(0.01)  # a consumer slower than the decoder
    assert taken and taken[-1].index == 59  # the newest frame is never lost
    pairs = zip(taken, taken[1:], strict=False)
    assert all(a.index < b.index and a.t_arrival < b.t_arrival for a, b in pairs)
    assert len(taken) + reader.overwritten == 60 and reader.reconnects == 0
    reader.stop()


def test_v4l2_options() -> None:
    spec = parse_v4l2("v4l2:///dev/video2?size=1920x1080&fps=60&format=yuyv")
    assert spec == V4l2Spec("/dev/video2", (1920, 1080), 60.0, "yuyv422")
    assert spec.options("yuyv422") == {"video_size": "1920x1080", "framerate": "60",
                                       "input_format": "yuyv422"}
    assert parse_v4l2("/dev/video0") == V4l2Spec("/dev/video0")
    assert parse_v4l2("v4l2:///dev/video0?format=MJPG").input_format == "mjpeg"
    for bad, why in (("v4l2:///dev/video0?size=big", "size"), ("v4l2:///dev/video0?fps=0", "fps"),
                     ("v4l2:///dev/video0?format=h265", "format"), ("v4l2:///dev/video0?gain=3", "gain"),
                     ("v4l2://video0", "device path")):
        with pytest.raises(SourceError, match=why):
            parse_v4l2(bad)
    with pytest.raises(SourceError, match="no such device /dev/video97"):
        check_uri("/dev/video97")


def test_stream_options() -> None:
    url, options = stream_options("rtsp://cart.local:8554/live?transport=udp&token=1")
    assert url == "rtsp://cart.local:8554/live?token=1" and options["rtsp_transport"] == "udp"
    assert stream_options("rtsp://cart.local/live")[1]["rtsp_transport"] == "tcp"
    assert stream_options("udp://127.0.0.1:5000")[1]["overrun_nonfatal"] == "1"
    assert stream_options("srt://127.0.0.1:9000")[1]["fflags"] == "nobuffer"


def test_unreachable_or_unknown_sources_are_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(SourceError, match=rf"source rtsp://127.0.0.1:{port}/live: cannot open"):
        open_source(f"rtsp://127.0.0.1:{port}/live", "gray")
    result = subprocess.run([sys.executable, str(REPO / "run_stream.py"), "--source", "/dev/video97",
                             "--validate-config"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "no such device /dev/video97" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_capture_prints_latency_and_reconnect_figures(tmp_path: Path) -> None:
    figures = tmp_path / "capture.json"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_capture.py"), "--size", "320x240",
                             "--seconds", "1", "--restarts", "1", "--down", "0.2", "--json", str(figures)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(figures.read_text())
    latency = report["latency_ms"]
    assert latency["count"] > 0 and 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    restart = report["restarts"][0]
    assert 0 < restart["reconnect_s"] <= restart["outage_s"]
    assert "capture latency arrival -> ring" in result.stdout and "restart 1: reconnect" in result.stdout


def test_a_protocol_this_ffmpeg_lacks_is_named() -> None:
    """PyAV's wheels carry an FFmpeg without libsrt: an SRT source says so in one line (a PyAV built on a
    system FFmpeg with libsrt reads it like any stream)."""
    try:
        source = open_source(f"srt://127.0.0.1:{free_udp_port()}?mode=caller", "gray")
    except SourceError as exc:
        assert "cannot" in str(exc) and str(exc).startswith("source srt://127.0.0.1:")
    else:  # an FFmpeg with SRT: nothing listens there, yet it opened; then it must be a live stream
        assert source.live
        source.close()
