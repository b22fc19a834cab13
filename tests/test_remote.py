"""Security and scale-out, with real processes and real sockets: CurveZMQ lets in only listed client keys
(ZAP) and counts the refused; a bind beyond loopback without keys is refused before start; remote infer
workers on loopback TCP score a run, and one killed mid-run costs at most the batch it held."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import REPO, read_journal, run_pipeline, run_stream_cmd, socket_dirs

from engines.bundle import load_bundle
from pipeline import wire
from pipeline.config import ConfigError, load_config
from pipeline.graph import pipeline_graph
from pipeline.letterbox import Geometry
from pipeline.messages import FrameRef, Kind, PreparedInput, control
from pipeline.remote import WorkerBook
from pipeline.security import ClientKeys, is_loopback

REFERENCE = str(REPO / "bundles" / "reference")
WAIT_S = 90  # the longest any step may take on a slow, shared machine (a bound, not a measurement)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys made by the real tool; `outsider` has the server's public key but is not on the allow-list."""
    out = tmp_path_factory.mktemp("curve") / "keys"
    made = subprocess.run([sys.executable, str(REPO / "tools" / "keys.py"), "--out", str(out),
                           "--clients", "worker-1,worker-2,listener,outsider"],
                          capture_output=True, text=True, cwd=REPO, check=True)
    assert "transport.curve_keys" in made.stdout
    (out / "clients" / "outsider.key").unlink()
    assert stat.S_IMODE((out / "server.key_secret").stat().st_mode) == 0o600
    return out


def start_run(out: Path, remote: str, events: str, source: str, *extra: str) -> subprocess.Popen:
    """A run whose inference is all remote (infer.workers = 0), on a live source that lasts until the
    test stops it."""
    cmd = run_stream_cmd("--source", source, "--engine", "ort", "--out", str(out), "--set", "infer.workers=0",
                         "--set", f"transport.remote={remote}", "--set", "run.health_interval=0.5", *extra)
    cmd[cmd.index("--events") + 1] = events
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_worker(remote: str, keys: Path | None, name: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "tools" / "infer_worker.py"), "--connect", remote,
           "--bundle", REFERENCE, "--engine", "ort", "--threads", "1", "--name", name, *extra]
    if keys is not None:
        cmd += ["--curve-keys", str(keys)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def subscriber(context: zmq.Context, endpoint: str, keys: Path | None) -> zmq.Socket:
    sub = context.socket(zmq.SUB)
    sub.linger = 0
    if keys is not None:
        ClientKeys.load(keys).apply(sub)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


def drain(sub: zmq.Socket) -> list[dict]:
    events = []
    while sub.poll(0):
        events.append(json.loads(sub.recv_multipart()[1]))
    return events


def wait_for_events(sub: zmq.Socket, count: int, run: subprocess.Popen,
                    wanted: Callable[[dict], bool]) -> list[dict]:
    """Events from `sub` that `wanted` accepts until `count` arrived; fails if the run ends or WAIT_S
    passes first."""
    found: list[dict] = []
    deadline = time.monotonic() + WAIT_S
    while len(found) < count:
        assert run.poll() is None, f"the run ended early: {run.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"only {len(found)} of {count} events awaited"
        if sub.poll(200):
            event = json.loads(sub.recv_multipart()[1])
            found += [event] if wanted(event) else []
    return found


def wait_for_frames(sub: zmq.Socket, count: int, run: subprocess.Popen) -> list[dict]:
    return wait_for_events(sub, count, run, lambda event: event["type"] == "frame")


def stop(process: subprocess.Popen) -> tuple[int, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    output, errors = process.communicate(timeout=WAIT_S)
    return process.returncode, (output or "") + (errors or "")


def test_curve_lets_in_only_listed_keys_and_counts_the_refused(tmp_path: Path, keys: Path) -> None:
    """Subscribers and workers with a listed key get events and work; without a key, or with an unlisted
    one, they get nothing, and every refused handshake is counted (health, summary). Local stages talk
    over ipc in a socket folder only this user can enter."""
    remote, events = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    dirs_before = socket_dirs()
    run = start_run(tmp_path / "run", remote, events, "synthetic://320x240?fps=30&frames=100000",
                    "--set", f"transport.curve_keys={keys}")  # not quiet: the console is a Curve client
    workers = {name: start_worker(remote, folder, name) for name, folder in (
        ("listed", keys / "client-worker-1"), ("bare", None), ("unlisted", keys / "client-outsider"))}
    context = zmq.Context()
    subs = {name: subscriber(context, events, folder) for name, folder in (
        ("listed", keys / "client-listener"), ("bare", None), ("unlisted", keys / "client-outsider"))}
    try:
        frames = wait_for_frames(subs["listed"], 30, run)
        assert {frame["model"] for frame in frames} == {"reference-intensity"}
        assert drain(subs["bare"]) == [] and drain(subs["unlisted"]) == []
        new_dirs = [Path("/tmp") / name for name in socket_dirs() - dirs_before]
        run_dirs = [d for d in new_dirs if (d / "control").exists()]
        assert run_dirs and all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in run_dirs)
    finally:
        for sub in subs.values():
            sub.close()
        context.term()
        code, log = stop(run)
        results = {name: stop(worker) for name, worker in workers.items()}
    assert code == 0, log[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    served = summary["remote_workers"]
    assert [name.rsplit("-", 1)[0] for name in served] == ["listed"], served
    assert next(iter(served.values()))["scored"] == summary["frames"]["scored"] > 0
    for name in ("bare", "unlisted"):
        assert results[name][0] == 0 and "done, 0 frames scored" in results[name][1]
    stages = summary["stages"]
    assert stages["preprocess"]["counters"]["refused"] >= 2  # the two workers, retrying
    assert stages["postprocess"]["counters"]["refused"] >= 2  # the two subscribers
    assert summary["refused_peers"] == (stages["preprocess"]["counters"]["refused"]
                                        + stages["postprocess"]["counters"]["refused"])
    health = read_journal(tmp_path / "run", "health")
    assert any(event["refused_peers"] > 0 and event["remote_workers"] for event in health)


@pytest.mark.parametrize("key", ["transport.remote", "postprocess.events", "postprocess.control"])
def test_a_bind_beyond_loopback_without_keys_is_refused_before_start(tmp_path: Path, key: str,
                                                                     keys: Path) -> None:
    endpoint = f"tcp://0.0.0.0:{free_port()}"
    refused = run_pipeline("--source", "synthetic://64x64?frames=5", "--out", str(tmp_path / "run"),
                           "--set", f"{key}={endpoint}", timeout=60)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "tools/keys.py" in lines[0], refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "run").exists()
    allowed = run_pipeline("--set", f"{key}={endpoint}", "--set", f"transport.curve_keys={keys}",
                           "--validate-config", timeout=60)
    assert allowed.returncode == 0, allowed.stderr


def test_a_killed_remote_worker_costs_at_most_its_batch_and_another_takes_over(tmp_path: Path,
                                                                              keys: Path) -> None:
    """A phantom case scored by a remote worker over loopback TCP with Curve; it is killed mid-run and
    another starts: the run goes on, the frames lost are at most the killed worker's batch (counted as
    drops, so the frame accounting still balances), and both are counted in health."""
    remote, events = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    batch = 4
    run = start_run(tmp_path / "run", remote, events, "phantom://7?cases=1&frames=200", "--quiet",
                    "--set", f"transport.curve_keys={keys}", "--set", "transport.remote_timeout_s=3")
    context = zmq.Context()
    listener = subscriber(context, events, keys / "client-listener")
    first = start_worker(remote, keys / "client-worker-1", "first", "--max-batch", str(batch))
    try:
        wait_for_frames(listener, 20, run)
        first.kill()
        first.wait()
        drain(listener)
        second = start_worker(remote, keys / "client-worker-2", "second", "--max-batch", str(batch))
        after = wait_for_frames(listener, 20, run)  # all scored by the second worker
        assert all(frame["model"] == "reference-intensity" for frame in after)
        # Both are counted in health. Awaited, not read from the journal after the stop: the second worker
        # may score its 20 frames (a backlog) inside one 0.5 s health interval, and the stop come first.
        both = wait_for_events(listener, 1, run, lambda event: event["type"] == "health"
                               and len(event.get("remote_workers", {})) == 2)[0]
        states = {name.rsplit("-", 1)[0]: w["state"] for name, w in both["remote_workers"].items()}
        assert states["second"] == "serving"
    finally:
        listener.close()
        context.term()
        code, log = stop(run)
    assert code == 0, log[-2000:]
    assert stop(second)[0] == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    workers = {name.rsplit("-", 1)[0]: figures for name, figures in summary["remote_workers"].items()}
    assert set(workers) == {"first", "second"}
    assert workers["first"]["scored"] > 0 and workers["second"]["scored"] > 0
    assert workers["first"]["state"] == "gone" and workers["first"]["lost"] <= batch
    counters = summary["stages"]["preprocess"]["counters"]
    assert counters.get("drop_worker_lost", 0) + counters.get("refine_gone", 0) == workers["first"]["lost"]
    # What the kill cost: frames it held (lost with it) and any sent to it after it died (unreachable).
    assert workers["first"]["lost"] + counters.get("drop_send_full", 0) <= batch
    assert counters["workers_joined"] == 2 and counters["workers_lost"] >= 1
    frames = summary["frames"]
    assert frames["balanced"], frames
    post = summary["stages"]["postprocess"]["counters"]
    assert counters["relayed"] == workers["first"]["scored"] + workers["second"]["scored"]
    assert post["scored"] + post.get("refined", 0) == counters["relayed"]


def test_a_worker_that_vanishes_with_a_batch_costs_exactly_that_batch(tmp_path: Path) -> None:
    """This test plays a remote worker (the protocol over a real DEALER, on loopback without keys beside a
    local infer process): it asks for a batch, takes it and vanishes. The run goes on; after the remote
    timeout exactly the frames it took are counted as dropped, and the accounting balances."""
    remote, events = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    run = start_run(tmp_path / "run", remote, events, "synthetic://320x240?fps=30&frames=100000", "--quiet",
                    "--set", "infer.workers=1", "--set", "transport.remote_timeout_s=1")
    context = zmq.Context()
    listener = subscriber(context, events, None)
    vanisher = context.socket(zmq.DEALER)
    vanisher.setsockopt(zmq.ROUTING_ID, b"vanisher-1")
    vanisher.linger = 0
    taken = 0
    try:
        wait_for_frames(listener, 5, run)
        vanisher.connect(remote)
        want = {"n": 4, "ask": 1, "bundle": load_bundle(REFERENCE).sha256, "relay": True}
        assert wire.send(vanisher, control(Kind.WANT, want), block=True)
        assert vanisher.poll(WAIT_S * 1000), "no work for a worker that asked"
        while vanisher.poll(1000):  # the rest of its batch, sent right behind the first frame
            assert wire.recv(vanisher).kind == Kind.INPUT.value
            taken += 1
        vanisher.close()
        wait_for_frames(listener, 60, run)  # two remote timeouts' worth at 30 fps: it was declared gone
    finally:
        vanisher.close()
        listener.close()
        context.term()
        code, log = stop(run)
    assert code == 0, log[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["remote_workers"] == {"vanisher-1": {"state": "gone", "scored": 0, "in_flight": 0,
                                                        "lost": taken}}
    counters = summary["stages"]["preprocess"]["counters"]
    assert 1 <= taken <= 4 and counters["drop_worker_lost"] == taken and counters["workers_lost"] == 1
    assert summary["frames"]["balanced"]
    boundary = summary["frames"]["boundaries"]["preprocess>infer"]
    assert boundary["drops"]["preprocess.drop_worker_lost"] == taken


def _prepared(frame_id: int, refined: bool = False) -> PreparedInput:
    stamps = {"cap": 0, "cap_out": 0, "pre_in": 0, "pre_out": 0}
    frame = FrameRef(frame_id, 0, 0, (8, 8), {"index": frame_id}, stamps)
    geometry = Geometry((0, 0, 8, 8), (0, 0), (8, 8), (1, 1))
    return PreparedInput(frame, geometry, 1.0, np.zeros((8, 8), np.uint8), refined)


def test_the_worker_book_loses_exactly_what_a_silent_worker_held_and_refuses_late_results() -> None:
    book = WorkerBook(timeout_s=5)
    assert book.heard(b"a", now=0.0) and not book.heard(b"a", now=1.0)
    book.heard(b"b", now=1.0)
    for frame_id in (1, 2, 3):
        book.gave(b"a", _prepared(frame_id))
    book.gave(b"b", _prepared(4))
    assert book.returned(b"a", 1).frame.id == 1 and book.returned(b"b", 1) is None  # not given to b
    assert book.in_flight == 3 and book.silent(now=5.5) == []
    book.heard(b"b", now=5.0)
    assert book.silent(now=6.5) == [b"a"]
    assert sorted(p.frame.id for p in book.forget(b"a")) == [2, 3]
    assert book.returned(b"a", 2) is None  # late: already counted lost
    assert book.heard(b"a", now=7.0)  # back, and used again
    assert book.status()["a"] == {"state": "serving", "scored": 1, "in_flight": 0, "lost": 2}
    assert book.serving() == 2 and book.in_flight == 1


def test_the_graph_and_config_of_remote_inference() -> None:
    """All inference remote: no local results link, the relay's instead; a cascade's main model may be
    remote too; nothing scoring, or an endpoint without a fixed port, is one clear error."""
    graph = pipeline_graph(infer_workers=0, remote="tcp://127.0.0.1:5560")
    assert graph.stage("infer").instances() == [] and graph.link("inputs").remote == "tcp://127.0.0.1:5560"
    assert [link.name for link in graph.links_into("postprocess", Kind.RESULT)] == ["remote_results"]
    assert ("preprocess", "drop_worker_lost") in graph.link("inputs").drops
    cascade = pipeline_graph(remote="tcp://127.0.0.1:5560", screen=True)
    assert cascade.link("screen_inputs").remote is None and cascade.link("inputs").remote is not None
    assert cascade.link("remote_results").serves == "refined"
    with pytest.raises(ValueError, match="nothing would score"):
        pipeline_graph(infer_workers=0)
    base = {"infer.bundle": REFERENCE}
    for overrides, error in (({"infer.workers": 0}, "needs transport.remote"),
                             ({"transport.remote": "tcp://127.0.0.1:*"}, "not tcp://ADDR:PORT"),
                             ({"transport.remote": "ipc:///tmp/x"}, "not tcp://ADDR:PORT"),
                             ({"transport.curve_keys": "/nonexistent"}, "no server.key_secret")):
        with pytest.raises(ConfigError, match=error):
            load_config(overrides={**base, **overrides})
    assert load_config(overrides={**base, "infer.workers": 0,
                                  "transport.remote": "tcp://127.0.0.1:5560"}).infer.workers == 0
    defaults = load_config(overrides=base).postprocess  # events and operator stay on this host by default
    assert is_loopback(defaults.events) and is_loopback(defaults.control)
    assert not any(is_loopback(e) for e in ("tcp://0.0.0.0:5556", "tcp://*:5556", "tcp://eth0:5556",
                                            "tcp://10.1.2.3:5556", "udp://*:1"))


def test_a_worker_with_bad_arguments_says_so_in_one_line(keys: Path) -> None:
    for extra, error in ((["--curve-keys", str(keys)], "is a server key folder"),
                         (["--connect", "ipc:///tmp/nowhere"], "is not tcp://HOST:PORT"),
                         (["--bundle", str(keys)], "has no bundle.json")):
        args = {"--connect": "tcp://127.0.0.1:1", "--bundle": REFERENCE}
        args.update(dict(zip(extra[::2], extra[1::2], strict=True)))
        done = subprocess.run([sys.executable, str(REPO / "tools" / "infer_worker.py"),
                               *(item for pair in args.items() for item in pair)],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 2 and error in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    twice = subprocess.run([sys.executable, str(REPO / "tools" / "infer_worker.py"), "--bundle", REFERENCE,
                            "--connect", "tcp://127.0.0.1:1", "--connect", "tcp://127.0.0.1:1"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert twice.returncode == 2 and "a run is named twice" in twice.stderr, twice.stderr
