"""Several pipelines at once sharing inference: the benchmark's --streams N (a cart with two probes, or a
server with several carts).

Each stream is a whole run (its own capture, preprocess and postprocess, run folder and journal) on its own
source, started together; inference is shared one of three ways (`--share`):

- `worker`: one infer worker process (pipeline/infer_worker.py, `--connect` once per run) serves every run
  over the run's `transport.remote` endpoint from one engine, one batch per run with work in turn;
- `kserve`: one KServe v2 server (engines/serve.py) answers every run's kserve engine;
- `none`: each run has its own infer stage (N engines competing for the machine's cores).

Fairness is the slowest stream's end-to-end p99 over the fastest's (1.0: all streams served alike).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from engines.bundle import load_bundle
from engines.serve import free_port, serving

from .config import Config
from .sources import is_phantom
from .sources.phantom import parse_phantom
from .supervisor import Supervisor

SHARES = ("worker", "kserve", "none")
WORKER_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "infer_worker.py"
STOP_WAIT_S = 30


def stream_uris(uri: str, streams: int) -> list[str]:
    """One source per stream: a phantom's seed is counted up (phantom://7 -> 7, 8, ...: different sweeps,
    as two probes or two carts would give); any other source is read by every stream."""
    if not is_phantom(uri):
        return [uri] * streams
    seed, parts = parse_phantom(uri)["seed"], urlsplit("phantom://" if uri == "phantom" else uri)
    return [urlunsplit(parts._replace(netloc=str(seed + i))) for i in range(streams)]


@contextmanager
def shared_inference(share: str, streams: int, bundle: str, engine: str, threads: int, log: Path,
                     max_batch: str = "auto") -> Iterator[list[dict[str, Any]]]:
    """Starts what the streams share (its output to `log`) and yields each stream's config overrides;
    stops it after. `threads` 0: the cores less one, as a run's engine takes."""
    if share not in SHARES:
        raise ValueError(f"--share: unknown way {share!r} ({', '.join(SHARES)})")
    if share == "none":
        yield [{} for _ in range(streams)]
        return
    threads = threads or max(1, (os.cpu_count() or 2) - 1)
    if share == "kserve":
        with serving(Path(bundle), threads=threads) as (_, grpc_port, _http):
            yield [{"infer.engine": "kserve", "infer.kserve_url": f"grpc://127.0.0.1:{grpc_port}",
                    "infer.kserve_model": load_bundle(bundle).name}] * streams
        return
    urls = [f"tcp://127.0.0.1:{free_port()}" for _ in range(streams)]
    command = [sys.executable, str(WORKER_SCRIPT), "--bundle", bundle, "--engine", engine,
               "--threads", str(threads), "--max-batch", max_batch, "--name", "shared"]
    for url in urls:
        command += ["--connect", url]
    with open(log, "w") as output:
        worker = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            yield [{"infer.workers": 0, "transport.remote": url} for url in urls]
        finally:
            _stop(worker, log)


def _stop(process: subprocess.Popen, log: Path) -> None:
    """The worker ends with the runs it serves; one that does not is stopped."""
    try:
        process.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait(STOP_WAIT_S)
    if process.returncode not in (0, -signal.SIGTERM):
        raise RuntimeError(f"the shared infer worker exited with code {process.returncode}; see {log}")


def run_streams(configs: list[Config]) -> list[int]:
    """Every stream's run at once, each a supervisor in its own process; their exit codes."""
    context = multiprocessing.get_context("spawn")
    runs = [context.Process(target=_run_one, args=(config,), name=f"stream-{i}")
            for i, config in enumerate(configs)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    return [run.exitcode for run in runs]


def _run_one(config: Config) -> None:
    sys.exit(Supervisor(config).run())


def fairness(p99_by_stream: list[float]) -> float | None:
    """The slowest stream's p99 over the fastest's."""
    values = [v for v in p99_by_stream if v]
    return round(max(values) / min(values), 3) if values else None


def combined_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The streams' run summaries as one: frames and throughput added up (per boundary too); per stage,
    the latency of the stream whose p99 there is the highest (percentiles do not add)."""
    frames = {key: sum(s["frames"][key] for s in summaries) for key in ("read", "scored", "dropped")}
    boundaries: dict[str, dict[str, int]] = {}
    for summary in summaries:
        for name, figures in summary["frames"]["boundaries"].items():
            entry = boundaries.setdefault(name, {"sent": 0, "dropped": 0})
            entry["sent"] += figures["sent"]
            entry["dropped"] += figures["dropped"]
    latency: dict[str, dict[str, float]] = {}
    for summary in summaries:
        for stage, figures in summary["latency_ms"].items():
            if figures.get("count") and figures["p99"] > latency.get(stage, {}).get("p99", -1.0):
                latency[stage] = figures
    return {"frames": {**frames, "boundaries": boundaries}, "latency_ms": latency,
            "throughput_fps": round(sum(s["throughput_fps"] for s in summaries), 2)}
