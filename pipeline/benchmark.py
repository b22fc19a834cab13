"""Measure the pipeline on recorded sweeps, and what it costs over doing the same work in one loop.

A suite: every source (the in-memory 1080p test pattern, and any --source: video files, .mha stacks,
DICOM, phantoms) x mode (paced at the native rate / flooded) x engine x batch limit x refine value x stream
count asked for (on the command line or in a --matrix TOML file) runs through the full pipeline, and in the
same run an
in-process loop does the same work on the same frames with the same settings (source read, preprocess,
engine, sweep analysis, event to a journal): the difference is what transport (ring, ZeroMQ, process hops)
adds, as ratios measured side by side. The default engine is `null` so inference cost does not hide it.

Per run: per-stage and end-to-end percentiles, throughput, frames read/scored/dropped per boundary, time
to the first event, CPU time and peak memory per process, host CPU steal, and on sources with ground truth
the decision latencies and how often the pick equals scoring every frame. With --streams N, N runs at once
on N sources share inference (--share: one infer worker, one KServe server, or none), with per-stream
latency and fairness (pipeline/streams.py). Writes JSON (with the machine),
a Markdown report next to it, and PNGs (latency CDF, latency over time, per-stage latency, and throughput
and p99 against the batch limit). --compare OLD.json exits 1 when a figure regressed beyond --tolerance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import tomllib
from tqdm import tqdm

from engines.bundle import load_bundle

from .analysis import SweepAnalyzer, resolve
from .bench_report import (
    TOLERANCE,
    ProcessSampler,
    compare_runs,
    first_event_s,
    machine,
    markdown,
    plot_all,
    plot_cdf,
    timeline,
)
from .capture import Pacer
from .config import ENGINE_CHOICES, REFERENCE_BUNDLE, Config, ConfigError, load_config
from .decisions import decisions, has_ground_truth
from .events import Journal, make_event, read_journal
from .letterbox import Letterbox
from .messages import FrameRef, Result
from .metrics import LatencyHistogram
from .sources import SourceError, check_uri, open_source
from .steps import analyzed_frame, frame_score, infer_batch, load_engine
from .streams import SHARES, combined_summary, fairness, run_streams, shared_inference, stream_uris
from .supervisor import Supervisor

TARGETS = {"overhead_p50_ms": 1.0, "overhead_p99_ms": 3.0, "flood_fps": 300.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", default=[], metavar="URI",
                        help="also benchmark this source: a video file, an image stack or folder, or "
                             "phantom://SEED?... (repeatable)")
    parser.add_argument("--no-pattern", action="store_true",
                        help="skip the in-memory test pattern (benchmark only the --source ones)")
    parser.add_argument("--size", default="1920x1080", help="size of the in-memory test pattern (WxH)")
    parser.add_argument("--pixel-format", choices=["bgr24", "gray"], default="bgr24",
                        help="pixel format carried through the ring (bgr24: 5.9 MB per 1080p frame)")
    parser.add_argument("--frames", type=int, default=600, help="frames per scenario")
    parser.add_argument("--fps", type=float, default=30.0, help="rate of the paced test pattern")
    parser.add_argument("--modes", default="paced,flood", help="comma-separated: paced, flood")
    parser.add_argument("--bundle", default=str(REFERENCE_BUNDLE),
                        help="model bundle directory (default: the reference bundle, for transport figures)")
    parser.add_argument("--engine", default="null", choices=ENGINE_CHOICES,
                        help="engine for both pipeline and baseline (null measures transport alone)")
    parser.add_argument("--threads", type=int, default=0,
                        help="engine intra-op threads, pipeline and baseline alike (0 = the run default: one "
                             "fewer than the usable cores)")
    parser.add_argument("--policy", choices=["latest", "lossless"], default="latest",
                        help="pipeline backpressure policy")
    parser.add_argument("--refine", default="auto",
                        help="comma-separated infer.refine values to run each scenario with (e.g. on,off)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any run config option for the pipeline runs, e.g. infer.rate_limit_fps=4 to "
                             "emulate a slower cart (repeatable); the baseline still scores every frame")
    parser.add_argument("--engines", help="comma-separated engines, one run each (default: --engine)")
    parser.add_argument("--batches", default="auto",
                        help="comma-separated infer.max_batch values, one run each (e.g. 1,4,8,auto)")
    parser.add_argument("--streams", default="1",
                        help="comma-separated stream counts, one run each: N sources at once sharing "
                             "inference (phantom://SEED gives seeds SEED..SEED+N-1; a file is read by every "
                             "stream)")
    parser.add_argument("--share", choices=SHARES, default="worker",
                        help="how N streams share inference: one infer worker serving every run (worker), "
                             "one KServe v2 server (kserve), or each run its own infer stage (none)")
    parser.add_argument("--skip", type=int, default=10,
                        help="warm-up and cool-down frames left out of the figures at each end")
    parser.add_argument("--matrix", type=Path,
                        help="a TOML file naming any of these options (sources, modes, engines, batches, "
                             "refine, frames, bundle, set, ...) instead of the command line")
    parser.add_argument("--compare", type=Path, metavar="OLD.json",
                        help="compare with a saved run; exit 1 when a figure regressed beyond --tolerance")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"relative change --compare accepts (default {TOLERANCE:g})")
    parser.add_argument("--json", type=Path, default=Path("bench_latency.json"),
                        help="where to write the figures (the Markdown report and PNGs go next to it)")
    parser.add_argument("--png", type=Path, help="latency CDF plot (default: next to --json)")
    args = parser.parse_args(argv)
    if args.matrix is not None:
        _apply_matrix(parser, args)
    return args


def _apply_matrix(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options from a TOML file (lists for the comma-separated ones); the command line's own are defaults."""
    try:
        table = tomllib.loads(args.matrix.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"bench_latency: --matrix {args.matrix}: {exc}") from None
    known = {action.dest for action in parser._actions} | {"sources"}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in known or dest in ("matrix", "help"):
            raise SystemExit(f"bench_latency: --matrix {args.matrix}: unknown option {key!r}")
        if dest == "sources":
            dest = "source"
        if isinstance(value, list) and dest not in ("source", "set"):
            value = ",".join(str(v) for v in value)
        setattr(args, dest, value)


def scenarios(args: argparse.Namespace) -> list[dict]:
    """Every source x mode x refine value asked for."""
    sources = [] if args.no_pattern else [(f"pattern {args.size}",
                                           f"synthetic://{args.size}?fps={args.fps:g}&frames={args.frames}")]
    for uri in args.source:
        try:
            check_uri(uri)
        except SourceError as exc:
            raise SystemExit(f"bench_latency: --source: {exc}") from None
        sources.append((uri.split("?")[0].replace("://", "-") if "://" in uri else Path(uri).name, uri))
    refines, batches = args.refine.split(","), args.batches.split(",")
    try:
        counts = [int(n) for n in str(args.streams).split(",")]
    except ValueError:
        raise SystemExit(f"bench_latency: --streams: {args.streams!r} is not a list of counts") from None
    if min(counts) < 1:
        raise SystemExit(f"bench_latency: --streams: {args.streams!r}: a count is at least 1")
    engines = (args.engines or args.engine).split(",")
    for engine in engines:
        if engine not in ENGINE_CHOICES:
            raise SystemExit(f"bench_latency: --engines: unknown engine {engine!r} "
                             f"({', '.join(ENGINE_CHOICES)})")
    out = []
    for mode in args.modes.split(","):
        if mode not in ("paced", "flood"):
            raise SystemExit(f"bench_latency: --modes: unknown mode {mode!r} (paced, flood)")
        for engine, batch, refine, streams in itertools.product(engines, batches, refines, counts):
            group = f"{mode}" + (f" {engine}" if len(engines) > 1 else "")
            group += f" refine={refine}" if len(refines) > 1 else ""
            group += f" streams={streams}" if streams > 1 or len(counts) > 1 else ""
            suffix = f" batch={batch}" if len(batches) > 1 else ""
            out += [{"name": f"{name} {group}{suffix}", "group": f"{name} {group}", "mode": mode,
                     "uri": uri, "refine": refine, "engine": engine, "max_batch": batch, "streams": streams}
                    for name, uri in sources]
    return out


def scenario_config(args: argparse.Namespace, scenario: dict, out: Path,
                    shared: dict | None = None) -> Config:
    """One scenario's run configuration: the pipeline and the baseline read the same one (`shared`: a
    stream's way to the inference it shares, for the pipeline only)."""
    extra = {**dict(item.partition("=")[::2] for item in args.set), **(shared or {})}
    try:
        return load_config(overrides={
            "source.uri": scenario["uri"], "source.flood": scenario["mode"] == "flood",
            "source.max_frames": args.frames, "source.pixel_format": args.pixel_format,
            "infer.bundle": args.bundle, "infer.engine": scenario.get("engine", args.engine),
            "infer.max_batch": scenario.get("max_batch", "auto"), "infer.threads": args.threads,
            "infer.refine": scenario["refine"], "transport.policy": args.policy,
            "postprocess.events": "tcp://127.0.0.1:*", "postprocess.control": None, "run.out": str(out),
            "run.summary_skip": args.skip, "run.quiet": True, **extra})
    except ConfigError as exc:
        raise SystemExit(f"bench_latency: {exc}") from None


def run_pipeline(config: Config, scenario: dict) -> tuple[dict, list[dict]]:
    out = Path(config.run.out)
    if Supervisor(config).run() != 0:
        raise SystemExit(f"bench_latency: pipeline run failed for {scenario['name']}; see {out}")
    return json.loads((out / "summary.json").read_text()), read_journal(out / "events.jsonl")


def run_stream_pipelines(args: argparse.Namespace, scenario: dict, workdir: Path
                         ) -> tuple[dict, list[dict], list[dict]]:
    """N runs at once sharing inference: the combined summary, every stream's events (in capture order),
    and per stream its source, frames, throughput and end-to-end latency."""
    count, uris = scenario["streams"], stream_uris(scenario["uri"], scenario["streams"])
    with shared_inference(args.share, count, args.bundle, scenario["engine"], args.threads,
                          workdir / "shared-inference.log", scenario["max_batch"]) as shared:
        configs = [scenario_config(args, {**scenario, "uri": uri}, workdir / f"stream-{index}", way)
                   for index, (uri, way) in enumerate(zip(uris, shared, strict=True))]
        codes = run_streams(configs)
    failed = [str(config.run.out) for config, code in zip(configs, codes, strict=True) if code != 0]
    if failed:
        raise SystemExit(f"bench_latency: {len(failed)} of {count} stream runs failed for "
                         f"{scenario['name']}; see {', '.join(failed)}")
    summaries = [json.loads((Path(c.run.out) / "summary.json").read_text()) for c in configs]
    journals = [read_journal(Path(c.run.out) / "events.jsonl") for c in configs]
    per_stream = [{"uri": uri, "run_id": summary["run_id"], "throughput_fps": summary["throughput_fps"],
                   **{key: summary["frames"][key] for key in ("read", "scored", "dropped")},
                   "end_to_end_events_ms": stats(newest_latencies(events), args.skip),
                   "latencies": newest_latencies(events)}
                  for uri, summary, events in zip(uris, summaries, journals, strict=True)]
    events = sorted((e for journal in journals for e in journal), key=lambda e: e.get("t_capture") or 0.0)
    return combined_summary(summaries), events, per_stream


def stream_figures(per_stream: list[dict], share: str) -> dict:
    """The JSON's `streams` object: how inference was shared, each stream's figures, and fairness."""
    rows = [{k: v for k, v in stream.items() if k != "latencies"} for stream in per_stream]
    return {"count": len(rows), "share": share, "per_stream": rows,
            "fairness_p99": fairness([row["end_to_end_events_ms"].get("p99") for row in rows])}


def newest_latencies(events: list[dict]) -> np.ndarray:
    """End-to-end latency of the newest-frame path (refined frames are late by design)."""
    return np.array([e["latency_ms"] for e in events if e["type"] == "frame" and not e.get("refined")])


def run_baseline(config: Config, workdir: Path) -> tuple[dict, list[dict]]:
    """The same work in one loop, through the same per-frame steps and settings as the stages (preprocess
    ROI and filter, engine, score, sweep analysis with the pixel-spacing fallback): no ring, no sockets,
    no process hops."""
    bundle = load_bundle(config.infer.bundle)
    engine, _ = load_engine(config.infer, bundle, max_batch=1)
    source = open_source(config.source.uri, config.source.pixel_format, config.preprocess.roi)
    pacer = None if config.source.flood or source.live else Pacer(source.fps)
    prepare = Letterbox.for_bundle(bundle.input, None, config.preprocess.interpolation)  # ROI: at the source
    journal = Journal(workdir / "baseline.jsonl", config.postprocess.fsync)
    analyzer = SweepAnalyzer(config.sweep.for_bundle(bundle.best_frame.min_score))
    mask_output = next((n for n, spec in bundle.outputs.items() if spec.kind == "mask"), None)
    ring_slot = None
    frames = 0
    t_start = time.monotonic()
    for frame_id in range(config.source.max_frames):
        frame = pacer.read(source) if pacer is not None else source.read()
        if frame is None:
            break
        if pacer is not None:
            pacer.wait(frame.pts)
        t_cap = time.monotonic_ns()
        if ring_slot is None or ring_slot.shape != frame.image.shape:
            ring_slot = np.empty_like(frame.image)
        np.copyto(ring_slot, frame.image)  # the pipeline's one full-resolution copy
        prepared = prepare(ring_slot)
        ref = FrameRef(frame_id, 0, 0, frame.image.shape, {"index": frame.index, "pts": frame.pts,
                                                             **frame.meta}, {"cap": t_cap})
        result = Result(ref, prepared.geometry, prepared.content,
                        infer_batch(engine, bundle, [prepared.pixels])[0])
        score = frame_score(bundle, result.outputs)
        analyzed = analyzed_frame(result, score, mask_output, config.postprocess.pixel_spacing_mm)
        for finding in resolve(analyzer.add(analyzed, ring_slot.copy())):
            journal.write(json.dumps(make_event(finding.type, "baseline", sweep_id=finding.sweep_id,
                                                frame_id=finding.frame_id, **finding.fields), default=str))
        latency = (time.monotonic_ns() - t_cap) / 1e6
        event = make_event("frame", "baseline", sweep_id=analyzer.tracker.sweep_id, frame_id=frame_id,
                           t_capture_ns=t_cap, score=score, latency_ms=latency, source=ref.source)
        journal.write(json.dumps(event, separators=(",", ":")))
        frames += 1
    for finding in resolve(analyzer.flush(time.monotonic())):
        journal.write(json.dumps(make_event(finding.type, "baseline", sweep_id=finding.sweep_id,
                                            frame_id=finding.frame_id, **finding.fields), default=str))
    elapsed = time.monotonic() - t_start
    journal.close()
    source.close()
    engine.close()
    return ({"frames": frames, "throughput_fps": round(frames / elapsed, 2), "fps": source.fps},
            read_journal(workdir / "baseline.jsonl"))


@contextmanager
def host_steal() -> Iterator[dict]:
    """Measures the share of the machine's CPU time its hypervisor gave to other guests while the block ran
    ("steal"; 0 on bare metal). On a shared cloud VM that, not the pipeline, is what moves the tail
    latencies from one run to the next, so each figure is reported with it."""
    result: dict = {}
    before = psutil.cpu_times()
    yield result
    after = psutil.cpu_times()
    fields = [f for f in after._fields if f not in ("guest", "guest_nice")]  # already counted in user time
    total = sum(getattr(after, f) - getattr(before, f) for f in fields)
    stolen = getattr(after, "steal", 0.0) - getattr(before, "steal", 0.0)
    result["steal_pct"] = round(100.0 * stolen / total, 2) if total > 0 else 0.0


def stats(values: np.ndarray, skip: int = 10) -> dict:
    hist = LatencyHistogram()
    hist.add(values[skip:len(values) - skip] if len(values) > 2 * skip else values)
    return hist.summary()


def compare(scenario: dict, summary: dict, pipe_lat: np.ndarray, base: dict, base_lat: np.ndarray,
            steal: dict[str, float], skip: int = 10) -> dict:
    pipe, baseline = stats(pipe_lat, skip), stats(base_lat, skip)
    frames = summary["frames"]
    result = {
        "scenario": scenario["name"], "scenario_group": scenario.get("group", scenario["name"]),
        "mode": scenario["mode"], "engine": scenario.get("engine"), "max_batch": scenario.get("max_batch"),
        "pipeline": {"throughput_fps": summary["throughput_fps"], "read": frames["read"],
                     "scored": frames["scored"], "dropped": frames["dropped"],
                     "drops_per_boundary": {k: v["dropped"] for k, v in frames["boundaries"].items()},
                     "latency_ms": summary["latency_ms"], "end_to_end_events_ms": pipe},
        "baseline": {**base, "latency_ms": baseline},
        "host_cpu_steal_pct": steal,
    }
    if pipe.get("count") and baseline.get("count"):
        result["overhead_ms"] = {q: round(pipe[q] - baseline[q], 3) for q in ("p50", "p99")}
        result["ratio"] = {q: round(pipe[q] / baseline[q], 2) for q in ("p50", "p99")}
        result["ratio"]["throughput"] = round(summary["throughput_fps"] / base["throughput_fps"], 2)
    return result


def print_result(result: dict) -> None:
    pipe, base = result["pipeline"], result["baseline"]
    print(f"\n== {result['scenario']}")
    print(f"  {'latency ms':<20}" + "".join(f"{k:>9}" for k in ("p50", "p90", "p99", "max")))
    for name, values in pipe["latency_ms"].items():
        if values.get("count"):
            print(f"  {name:<20}" + "".join(f"{values[k]:>9.3f}" for k in ("p50", "p90", "p99", "max")))
    if base["latency_ms"].get("count"):
        values = base["latency_ms"]
        row = "".join(f"{values[k]:>9.3f}" for k in ("p50", "p90", "p99", "max"))
        print(f"  {'baseline (1 loop)':<20}{row}")
    print(f"  throughput: pipeline {pipe['throughput_fps']} fps, baseline {base['throughput_fps']} fps")
    print(f"  frames: read {pipe['read']}, scored {pipe['scored']}, dropped {pipe['dropped']} "
          f"{pipe['drops_per_boundary']}")
    steal = result["host_cpu_steal_pct"]
    print(f"  host CPU steal: pipeline {steal['pipeline']:.1f} %, baseline {steal['baseline']:.1f} % "
          f"(CPU time the hypervisor gave other guests; above ~1 % it shows in the tails)")
    if "decisions" in result:
        d = result["decisions"]["summary"]
        print(f"  decisions over {d['sweeps']} sweeps ({d['sweeps_with_optimal']} with an optimal frame): "
              f"same pick as scoring every frame {_pct(d['same_pick_rate'])}, optimal picks "
              f"{_pct(d['optimal_pick_rate'])} (every frame: {_pct(d['every_frame_optimal_pick_rate'])}); "
              f"sweep end -> final p50 {d['decision_ms']['p50']} ms, max {d['decision_ms']['max']} ms; "
              f"first optimal frame -> best_frame naming one p50 {d['first_optimal_to_best_ms']['p50']} ms, "
              f"max {d['first_optimal_to_best_ms']['max']} ms, never named in {d['optimal_never_named']}")
    if "streams" in result:
        streams = result["streams"]
        print(f"  {streams['count']} streams sharing inference ({streams['share']}); fairness (slowest p99 / "
              f"fastest p99) x{streams['fairness_p99']}")
        for index, stream in enumerate(streams["per_stream"]):
            e2e = stream["end_to_end_events_ms"]
            print(f"    stream {index} {stream['uri']}: p50 {e2e.get('p50')} ms, p99 {e2e.get('p99')} ms, "
                  f"scored {stream['scored']} of {stream['read']}, {stream['throughput_fps']} fps")
    if "overhead_ms" in result:
        print(f"  transport overhead: p50 {result['overhead_ms']['p50']:+.3f} ms, "
              f"p99 {result['overhead_ms']['p99']:+.3f} ms; ratio pipeline/baseline "
              f"p50 x{result['ratio']['p50']}, p99 x{result['ratio']['p99']}, "
              f"throughput x{result['ratio']['throughput']}")


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.0f} %"


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (name, (pipe, base)) in enumerate(curves.items()):
        for values, style, label in ((pipe, "-", "pipeline"), (base, "--", "baseline")):
            plot_cdf(ax, values, style, color=f"C{index}", label=f"{name} {label}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("fraction of frames")
    ax.set_title("sweepstream latency CDF: four-process pipeline vs one loop")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results, curves, series, stream_curves = [], {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        todo = scenarios(args)
        for scenario in tqdm(todo, desc="scenarios", unit="run"):
            workdir = Path(tmp) / str(len(results))
            workdir.mkdir()
            config = scenario_config(args, scenario, workdir / scenario["name"].replace(" ", "_"))
            started, per_stream = time.time(), None
            with host_steal() as pipe_steal, ProcessSampler() as sampler:
                if scenario["streams"] > 1:
                    summary, pipe_events, per_stream = run_stream_pipelines(args, scenario, workdir)
                else:
                    summary, pipe_events = run_pipeline(config, scenario)
            with host_steal() as base_steal:
                base, base_events = run_baseline(config, workdir)
            steal = {"pipeline": pipe_steal["steal_pct"], "baseline": base_steal["steal_pct"]}
            pipe_lat, base_lat = newest_latencies(pipe_events), newest_latencies(base_events)
            result = compare(scenario, summary, pipe_lat, base, base_lat, steal, args.skip)
            result["processes"] = sampler.figures()
            result["first_event_s"] = first_event_s(pipe_events, started)
            first_stream = pipe_events if per_stream is None else [
                e for e in pipe_events if e.get("run_id") == per_stream[0]["run_id"]]
            if has_ground_truth(base_events):  # the baseline reads the first stream's source
                result["decisions"] = decisions(first_stream, base_events, base["fps"])
            if per_stream is not None:
                result["streams"] = stream_figures(per_stream, args.share)
                stream_curves[scenario["name"]] = [s["latencies"] for s in per_stream]
            results.append(result)
            curves[scenario["name"]] = (pipe_lat, base_lat)
            series[scenario["name"]] = timeline(pipe_events)
    for result in results:
        print_result(result)
    report = {"machine": machine(), "targets": TARGETS, "engine": args.engine, "bundle": args.bundle,
              "pixel_format": args.pixel_format, "frames_per_scenario": args.frames, "skip": args.skip,
              "results": results}
    code = 0
    if args.compare is not None:
        try:
            old = json.loads(args.compare.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"bench_latency: --compare {args.compare}: {exc}") from None
        lines, regressions = compare_runs(report, old, args.tolerance)
        report["comparison"] = {"against": str(args.compare), "tolerance": args.tolerance, "lines": lines,
                                "regressions": regressions}
        print(f"\nagainst {args.compare} (tolerance {100 * args.tolerance:.0f} %):")
        print("\n".join(f"  {line}" for line in lines))
        print(f"  {len(regressions)} regression(s)" + "".join(f"\n  REGRESSED {r}" for r in regressions))
        code = 1 if regressions else 0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    args.json.with_suffix(".md").write_text(markdown(report))
    png = args.png or args.json.with_suffix(".png")
    plot(curves, png)
    extra = plot_all(report, series, args.json.with_suffix(""), stream_curves)
    print(f"\nwrote {args.json}, {args.json.with_suffix('.md')}, {png}" + "".join(f", {p}" for p in extra))
    return code
