"""tools/listen.py against a real running pipeline over a real TCP PUB socket."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from conftest import REPO, run_stream_cmd

from pipeline.events import EVENT_TYPES


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_listen_prints_the_pipelines_events(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    listen = [sys.executable, str(REPO / "tools" / "listen.py"), "--endpoint", endpoint, "--count", "5",
              "--timeout", "60"]
    raw = subprocess.Popen([*listen, "--json", "--type", "frame"], stdout=subprocess.PIPE, text=True)
    pretty = subprocess.Popen(listen, stdout=subprocess.PIPE, text=True)
    cmd = run_stream_cmd("--source", "synthetic://320x240?fps=30&frames=200", "--quiet",
                         "--out", str(tmp_path / "run"))
    cmd[cmd.index("--events") + 1] = endpoint
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    raw_out, _ = raw.communicate(timeout=30)
    pretty_out, _ = pretty.communicate(timeout=30)
    assert raw.returncode == 0 and pretty.returncode == 0
    events = [json.loads(line) for line in raw_out.splitlines()]
    assert len(events) == 5 and all(e["type"] == "frame" and e["schema"] == 1 for e in events)
    lines = pretty_out.splitlines()
    assert len(lines) == 5 and all(line.split()[0] in EVENT_TYPES and " ms " in line for line in lines)


def test_listen_times_out_with_one_line() -> None:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "listen.py"), "--endpoint",
                             f"tcp://127.0.0.1:{_free_port()}", "--timeout", "0.5"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stderr.strip() == "listen: no event for 0.5 s"
