"""The graph is the one declaration of the run's shape: every counter a stage keeps is declared in it, the
accounting follows from it, and other shapes (several infer workers, a worker on a TCP endpoint) run from
it with the stages unchanged."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from pipeline.config import REFERENCE_BUNDLE, load_config
from pipeline.graph import ROLES, Graph, Link, StageSpec, frame_accounting, pipeline_graph
from pipeline.messages import Kind
from pipeline.supervisor import Supervisor
from pipeline.sweep import OPERATOR_COMMANDS

REPO = Path(__file__).resolve().parents[1]


def _counted_names(source: str) -> set[str]:
    names = set(re.findall(r'counters\["(\w+)"\]', source))
    names |= set(re.findall(r'\bsent(?:: str)? ?= ?"(\w+)"', source))  # push(..., sent="relayed")
    for prefix in re.findall(r'counters\[f"(\w+)\{name\}"\]', source):
        names |= {prefix + command for command in OPERATOR_COMMANDS}
    return names


def test_every_counter_a_stage_increments_is_declared_in_the_graph() -> None:
    """Read from the stages' source: what each counts itself, plus what the base class counts for it in
    `take` (received, drop_stale, rejected) and `push` (sent, drop_send_full). The graph with a remote
    endpoint declares the most (its relay and remote workers' counters)."""
    graph = pipeline_graph(remote="tcp://127.0.0.1:5560")
    base = (REPO / "pipeline" / "stage.py").read_text()
    by_call = {"self.take(": {"received", "drop_stale", "rejected"}, "self.push(": {"sent", "drop_send_full"}}
    assert set().union(*by_call.values()) <= _counted_names(base)
    for spec in graph.stages:
        source = (REPO / (ROLES[spec.role].split(":")[0].replace(".", "/") + ".py")).read_text()
        used = _counted_names(source).union(*(names for call, names in by_call.items() if call in source))
        declared = graph.counters_of(spec.name)
        assert used and used <= declared, f"{spec.name}: undeclared {sorted(used - declared)}"


def test_every_drop_a_boundary_can_have_is_on_that_boundary() -> None:
    graph = pipeline_graph()
    assert [link.boundary for link in graph.links if link.carries_frames] == [
        "capture>preprocess", "preprocess>infer", "infer>postprocess"]
    assert [link.name for link in graph.links if not link.carries_frames] == ["refine"]
    assert "refine" not in [link.name for link in pipeline_graph(refine=False).links]
    counters = {"capture": {"read": 100, "sent": 95, "drop_send_full": 5},
                "preprocess": {"drop_stale": 3, "drop_overwritten": 2, "sent": 90, "rejected": 1},
                "infer": {"drop_stale": 10, "sent": 79},
                "postprocess": {"scored": 79}}
    accounting = frame_accounting(counters, graph)
    assert accounting["balanced"] and accounting["dropped"] == 21
    assert accounting["boundaries"]["preprocess>infer"]["drops"]["infer.drop_stale"] == 10


def test_a_graph_that_names_an_unknown_stage_or_misplaced_counter_is_refused() -> None:
    stages = (StageSpec("a", "capture"), StageSpec("b", "postprocess"))
    with pytest.raises(ValueError, match="unknown stage 'c'"):
        Graph(stages, (Link("x", "a", "c", Kind.FRAME, "push", "sender", "transport", "", ()),),
              pipeline_graph().ring)
    with pytest.raises(ValueError, match="counts drops in 'z'"):
        Graph(stages, (Link("x", "a", "b", Kind.FRAME, "push", "sender", "transport", "", (("z", "d"),)),),
              pipeline_graph().ring)
    assert StageSpec("infer", "infer", replicas=3).instances() == ["infer-0", "infer-1", "infer-2"]


def _run(tmp_path: Path, graph: Graph, **overrides: object) -> dict:
    out = tmp_path / "run"
    config = load_config(overrides={
        "source.uri": "synthetic://320x240?frames=120", "source.flood": True, "transport.policy": "lossless",
        "infer.bundle": str(REFERENCE_BUNDLE), "infer.engine": "ort", "infer.max_batch": 1,
        "infer.threads": 1, "postprocess.events": "tcp://127.0.0.1:*", "postprocess.control": None,
        "run.out": str(out), "run.quiet": True, **overrides})
    assert Supervisor(config, graph).run() == 0
    return json.loads((out / "summary.json").read_text())


def test_two_infer_workers_share_the_work_with_no_stage_changed(tmp_path: Path) -> None:
    summary = _run(tmp_path, pipeline_graph(infer_workers=2))
    frames = summary["frames"]
    assert frames["read"] == frames["scored"] == 120 and frames["balanced"]
    workers = {name: stage["counters"].get("sent", 0) for name, stage in summary["stages"].items()
               if name.startswith("infer")}
    assert sorted(workers) == ["infer-0", "infer-1"] and sum(workers.values()) == 120
    assert frames["boundaries"]["infer>postprocess"]["sent"] == 120  # replicas add up
    assert summary["graph"]["stages"]["infer"]["processes"] == ["infer-0", "infer-1"]
    assert summary["graph"]["links"]["inputs"]["pattern"] == "work"


def test_a_worker_can_reach_preprocess_over_tcp(tmp_path: Path) -> None:
    """The remote-worker path: preprocess serves work on a fixed TCP endpoint (what a worker on another
    machine connects to); the local worker uses the same endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    summary = _run(tmp_path, pipeline_graph(inputs_endpoint=f"tcp://127.0.0.1:{port}"))
    assert summary["frames"]["scored"] == 120 and summary["frames"]["balanced"]
