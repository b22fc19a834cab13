"""The benchmark's reporting side, apart from running anything: the machine it ran on, the stage
processes' CPU time and memory while a run lasts, the Markdown report, the plots, and the comparison of a
run against a saved one (for CI between versions or carts)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "neon", "asimd")
LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "pyzmq", "opencv-python-headless", "av", "torch",
             "tensorrt", "tritonclient")
# What --compare treats as a regression, relative to the saved run (these machines are noisy: a quarter).
TOLERANCE = 0.25
COLUMNS = ("p50", "p90", "p95", "p99", "max", "mean", "std")


def machine() -> dict[str, Any]:
    """What the figures depend on: CPU model, cores and the instruction sets that decide int8 speed
    (AVX512-VNNI/AMX), memory, GPU, and the versions of the libraries on the data path."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "logical_cpus": os.cpu_count(),
            "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": _gpus(),
            "python": platform.python_version(), "platform": platform.platform(), "libraries": versions}


def _gpus() -> list[dict[str, str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, memory, driver = (part.strip() for part in line.split(",")[:3])
        gpus.append({"name": name, "memory": memory, "driver": driver})
    return gpus


class ProcessSampler:
    """CPU time and peak resident memory of this process's stage descendants (titled `sweepstream: NAME`)
    while a pipeline run lasts, sampled from a thread; a restarted stage's lives, and the same stage of
    several streams, are added up (peak memory: the largest one). Where nvidia-smi is present, also each
    process's peak GPU memory (sampled every `gpu_interval_s`: the query takes tens of ms)."""

    def __init__(self, interval_s: float = 0.2, gpu_interval_s: float = 1.0) -> None:
        self.interval_s, self.gpu_interval_s = interval_s, gpu_interval_s
        self._seen: dict[int, tuple[str, float, float]] = {}  # pid -> (stage, cpu s, peak rss MiB)
        self._gpu: dict[int, float] = {}  # pid -> peak GPU MiB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._smi = shutil.which("nvidia-smi")

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        next_gpu = 0.0
        while not self._stop.wait(self.interval_s):
            for child in me.children(recursive=True):  # --streams: each run's stages under its supervisor
                try:
                    title = " ".join(child.cmdline()).strip()
                    if not title.startswith("sweepstream: "):
                        continue
                    cpu = child.cpu_times()
                    rss = child.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                stage = title.removeprefix("sweepstream: ")
                peak = max(rss, self._seen.get(child.pid, (stage, 0.0, 0.0))[2])
                self._seen[child.pid] = (stage, cpu.user + cpu.system, peak)
            if self._smi is not None and time.monotonic() >= next_gpu:
                next_gpu = time.monotonic() + self.gpu_interval_s
                for pid, mib in gpu_memory_by_pid(self._query_gpu()).items():
                    self._gpu[pid] = max(mib, self._gpu.get(pid, 0.0))

    def _query_gpu(self) -> str:
        try:
            return subprocess.run([self._smi, "--query-compute-apps=pid,used_memory",
                                   "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                  timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    def figures(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for pid, (stage, cpu, peak) in self._seen.items():
            entry = out.setdefault(stage, {"cpu_s": 0.0, "peak_rss_mib": 0.0})
            entry["cpu_s"] = round(entry["cpu_s"] + cpu, 3)
            entry["peak_rss_mib"] = round(max(entry["peak_rss_mib"], peak), 1)
            if pid in self._gpu:
                entry["peak_gpu_mib"] = round(max(entry.get("peak_gpu_mib", 0.0), self._gpu[pid]), 1)
        return out


def gpu_memory_by_pid(csv: str) -> dict[int, float]:
    """`nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` -> MiB by pid (a
    process on several GPUs: their sum; lines it cannot read, such as "[N/A]", are left out)."""
    out: dict[int, float] = {}
    for line in csv.strip().splitlines():
        pid, _, used = (part.strip() for part in line.partition(","))
        try:
            out[int(pid)] = out.get(int(pid), 0.0) + float(used)
        except ValueError:
            continue
    return out


def compare_runs(new: dict[str, Any], old: dict[str, Any], tolerance: float = TOLERANCE
                 ) -> tuple[list[str], list[str]]:
    """Scenario by scenario (by name): end-to-end p50/p99, throughput and, with ground truth, the share of
    picks equal to every-frame scoring. Returns (lines to print, the regressions among them)."""
    before = {r["scenario"]: r for r in old.get("results", [])}
    lines, regressions = [], []
    for result in new.get("results", []):
        name = result["scenario"]
        was = before.get(name)
        if was is None:
            lines.append(f"{name}: new scenario (not in the saved run)")
            continue
        for label, now_value, old_value, worse in _figures(result, was):
            if now_value is None or old_value is None:
                continue
            change = (now_value - old_value) / old_value if old_value else 0.0
            line = f"{name}: {label} {old_value:g} -> {now_value:g} ({100 * change:+.1f} %)"
            lines.append(line)
            if (worse == "higher" and change > tolerance) or (worse == "lower" and change < -tolerance):
                regressions.append(line)
    return lines, regressions


def _figures(new: dict[str, Any], old: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
    def e2e(result: dict, q: str) -> float | None:
        return result["pipeline"]["end_to_end_events_ms"].get(q)

    def same_pick(result: dict) -> float | None:
        return result.get("decisions", {}).get("summary", {}).get("same_pick_rate")

    def fairness(result: dict) -> float | None:
        return result.get("streams", {}).get("fairness_p99")
    return [("e2e p50 ms", e2e(new, "p50"), e2e(old, "p50"), "higher"),
            ("e2e p99 ms", e2e(new, "p99"), e2e(old, "p99"), "higher"),
            ("throughput fps", new["pipeline"]["throughput_fps"], old["pipeline"]["throughput_fps"], "lower"),
            ("same pick rate", same_pick(new), same_pick(old), "lower"),
            ("stream fairness p99", fairness(new), fairness(old), "higher")]


def markdown(report: dict[str, Any]) -> str:
    """The report a person reads: the machine, then per scenario its latency table, frames, throughput,
    process costs, decisions and the ratios to the in-process baseline."""
    m = report["machine"]
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of note"
    gpus = "; ".join(f"{g['name']} ({g['memory']})" for g in m["gpu"]) or "none"
    out = ["# sweepstream latency benchmark", "",
           f"- machine: {m['cpu']}, {m['cores']} usable cores, {m['memory_gib']} GiB; CPU flags: {flags}; "
           f"GPU: {gpus}",
           f"- libraries: {', '.join(f'{k} {v}' for k, v in m['libraries'].items())}; Python {m['python']}",
           f"- {report['frames_per_scenario']} frames per scenario; the first and last {report['skip']} "
           "skipped in the figures", ""]
    for result in report["results"]:
        pipe, base = result["pipeline"], result["baseline"]
        out += [f"## {result['scenario']}", "", "| latency ms | " + " | ".join(COLUMNS) + " |",
                "|---" * (len(COLUMNS) + 1) + "|"]
        rows = [(name, values) for name, values in pipe["latency_ms"].items() if values.get("count")]
        if base["latency_ms"].get("count"):
            rows.append(("baseline (one loop)", base["latency_ms"]))
        out += [f"| {name} | " + " | ".join(_cell(values.get(k)) for k in COLUMNS) + " |"
                for name, values in rows]
        out += ["", f"- frames: read {pipe['read']}, scored {pipe['scored']}, dropped {pipe['dropped']} "
                    f"({', '.join(f'{k} {v}' for k, v in pipe['drops_per_boundary'].items())})",
                f"- throughput: pipeline {pipe['throughput_fps']} fps, baseline {base['throughput_fps']} "
                f"fps; first event {result.get('first_event_s', '-')} s after the start",
                f"- host CPU steal: pipeline {result['host_cpu_steal_pct']['pipeline']} %, baseline "
                f"{result['host_cpu_steal_pct']['baseline']} %"]
        if result.get("processes"):
            out.append("- processes: " + ", ".join(
                f"{name} {v['cpu_s']} CPU s, peak {v['peak_rss_mib']} MiB"
                + (f", GPU {v['peak_gpu_mib']} MiB" if "peak_gpu_mib" in v else "")
                for name, v in sorted(result["processes"].items())))
        if "ratio" in result:
            ratio = result["ratio"]
            out.append(f"- pipeline / baseline: p50 x{ratio['p50']}, p99 x{ratio['p99']}, "
                       f"throughput x{ratio['throughput']}")
        if "streams" in result:
            streams = result["streams"]
            out += [f"- {streams['count']} streams at once sharing inference ({streams['share']}); per-stage "
                    f"rows above are the slowest stream's; fairness (slowest stream's p99 / fastest's) "
                    f"x{streams['fairness_p99']}; decisions below: the first stream's", "",
                    "| stream | source | read | scored | dropped | fps | e2e p50 ms | e2e p99 ms |",
                    "|---" * 8 + "|"]
            out += [f"| {i} | {row['uri']} | {row['read']} | {row['scored']} | {row['dropped']} | "
                    f"{row['throughput_fps']} | {_cell(row['end_to_end_events_ms'].get('p50'))} | "
                    f"{_cell(row['end_to_end_events_ms'].get('p99'))} |"
                    for i, row in enumerate(streams["per_stream"])]
            out.append("")
        if "decisions" in result:
            d = result["decisions"]["summary"]
            out.append(f"- decisions over {d['sweeps']} sweeps ({d['sweeps_with_optimal']} with an optimal "
                       f"frame): same pick as every frame {_rate(d['same_pick_rate'])}, optimal picks "
                       f"{_rate(d['optimal_pick_rate'])} (every frame "
                       f"{_rate(d['every_frame_optimal_pick_rate'])}); decision_ms p50 "
                       f"{d['decision_ms']['p50']}, max {d['decision_ms']['max']}; first "
                       f"optimal -> best_frame p50 {d['first_optimal_to_best_ms']['p50']} ms")
        out.append("")
    if report.get("comparison"):
        out += ["## Against the saved run", "", *[f"- {line}" for line in report["comparison"]["lines"]], ""]
    return "\n".join(out)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.0f} %"


def plot_all(report: dict[str, Any], series: dict[str, dict[str, np.ndarray]], stem: Path,
             streams: dict[str, list[np.ndarray]] | None = None) -> list[Path]:
    """PNG files next to the JSON: latency over time per scenario, throughput and p99 against the batch
    limit where more than one was run, and the latency CDF of each stream where several ran at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for index, (name, data) in enumerate(series.items()):
        if len(data["t"]):
            ax.plot(data["t"] - data["t"][0], data["latency"], ".", ms=2, color=f"C{index}", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("capture time (s from the first frame)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("latency over time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, markerscale=4)
    fig.tight_layout()
    written.append(_save(fig, stem, "timeline", plt))
    batches = [r for r in report["results"] if r.get("max_batch") is not None]
    if len({str(r["max_batch"]) for r in batches}) > 1:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        groups: dict[str, list[dict]] = {}
        for result in batches:
            groups.setdefault(result["scenario_group"], []).append(result)
        for group, results in groups.items():
            results = sorted(results, key=lambda r: (r["max_batch"] == "auto", str(r["max_batch"])))
            labels = [str(r["max_batch"]) for r in results]
            left.plot(labels, [r["pipeline"]["throughput_fps"] for r in results], "o-", label=group)
            right.plot(labels, [r["pipeline"]["end_to_end_events_ms"].get("p99") for r in results], "o-",
                       label=group)
        left.set_xlabel("infer.max_batch")
        left.set_ylabel("throughput (fps)")
        right.set_xlabel("infer.max_batch")
        right.set_ylabel("end-to-end p99 (ms)")
        left.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, stem, "batch", plt))
    if streams:
        fig, axes = plt.subplots(1, len(streams), figsize=(5 * len(streams), 4), squeeze=False)
        for ax, (name, latencies) in zip(axes[0], streams.items(), strict=True):
            for index, values in enumerate(latencies):
                plot_cdf(ax, values, label=f"stream {index}")
            ax.set_xscale("log")
            ax.set_xlabel("end-to-end latency (ms)")
            ax.set_ylabel("fraction of frames")
            ax.set_title(name, fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, stem, "streams", plt))
    stage_figure = _stage_cdfs(report, plt)
    if stage_figure is not None:
        written.append(_save(stage_figure, stem, "stages", plt))
    return written


def _save(fig: Any, stem: Path, kind: str, plt: Any) -> Path:
    path = stem.with_name(f"{stem.name}-{kind}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cdf(ax: Any, values: np.ndarray, *style: str, **kwargs: Any) -> None:
    """The empirical CDF of `values` on `ax` (nothing for none)."""
    if len(values):
        ordered = np.sort(values)
        ax.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), *style, **kwargs)


def _stage_cdfs(report: dict[str, Any], plt: Any) -> Any:
    """Per-stage latency distributions (from the summary's percentiles, one panel per scenario)."""
    results = report["results"]
    if not results:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.8), squeeze=False)
    quantiles = (50, 90, 95, 99)
    for ax, result in zip(axes[0], results, strict=True):
        for name, values in result["pipeline"]["latency_ms"].items():
            if values.get("count") and name != "end_to_end":
                ax.plot([values[f"p{q}"] for q in quantiles] + [values["max"]], [*quantiles, 100], "o-",
                        ms=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("percentile")
        ax.set_title(result["scenario"], fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def first_event_s(events: list[dict[str, Any]], started_wall: float) -> float | None:
    """Seconds from the run's start (processes spawned, engines loaded) to its first frame event."""
    times = [e["t_event"] for e in events if e.get("type") == "frame" and e.get("t_event") is not None]
    return round(min(times) - started_wall, 3) if times else None


def timeline(events: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    frames = [e for e in events if e.get("type") == "frame" and not e.get("refined")
              and e.get("t_capture") is not None]
    return {"t": np.array([e["t_capture"] for e in frames]),
            "latency": np.array([e["latency_ms"] for e in frames])}

