"""sweepstream: score a live blind-sweep ultrasound video with a FetalCLIP bundle and emit events.

With no arguments it runs the demo: phantom blind sweeps streamed live at 30 fps through the demo bundle
(trained on synthetic phantoms; not for clinical use). Starts a supervisor that runs capture, preprocess,
infer and postprocess as separate processes connected by ZeroMQ. Events go to a PUB socket and to
<out>/events.jsonl; latency figures to <out>/summary.json.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import ENGINE_CHOICES, ConfigError, describe_options, load_config

# Flags that are shortcuts for config keys (the same key may also be set with --set or in --config).
SHORTCUTS = {
    "source": "source.uri", "flood": "source.flood", "loop": "source.loop", "max_frames": "source.max_frames",
    "duration": "source.duration", "bundle": "infer.bundle", "engine": "infer.engine", "out": "run.out",
    "events": "postprocess.events", "control": "postprocess.control", "quiet": "run.quiet",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=describe_options(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", metavar="PATH_OR_URL",
                        help="video file, stream URL (rtsp/udp/srt/http), /dev/videoN or v4l2://..., DICOM "
                        "file or series folder, image folder, image stack or case folder, phantom[://SEED] "
                        "or synthetic://WxH (default: the demo, phantom://7?cases=1)")
    parser.add_argument("--bundle", metavar="DIR", help="model bundle directory (default: bundles/demo)")
    parser.add_argument("--engine", choices=ENGINE_CHOICES,
                        help="inference backend (default auto: TensorRT, then torch-CUDA, then ONNX Runtime)")
    parser.add_argument("--out", metavar="DIR", help="run folder (default runs/<time>-<id>)")
    parser.add_argument("--events", metavar="ENDPOINT", help="ZeroMQ PUB endpoint (default tcp://127.0.0.1:5556)")
    parser.add_argument("--control", metavar="ENDPOINT",
                        help="ZeroMQ REP endpoint for operator sweep start/stop "
                        "(default tcp://127.0.0.1:5557; none: off)")
    parser.add_argument("--flood", action="store_true", default=None,
                        help="read the source as fast as possible")
    parser.add_argument("--loop", action="store_true", default=None, help="restart the source at its end")
    parser.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    parser.add_argument("--quiet", action="store_true", default=None, help="no live status line")
    parser.add_argument("--config", metavar="FILE", help="TOML file with [source], [infer], ... sections")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config option (repeatable)")
    parser.add_argument("--validate-config", action="store_true",
                        help="check the configuration, print it resolved, and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream` command (and run_stream.py): exit 0 on a clean run, 2 on a bad configuration."""
    try:
        return run(argv)
    except KeyboardInterrupt:  # Ctrl-C before the supervisor took over signals: nothing was started yet
        print("sweepstream: interrupted before the pipeline started", file=sys.stderr)
        return 130


def run(argv: list[str] | None) -> int:
    """Parse, resolve the configuration, then hand the run to the supervisor."""
    args = build_parser().parse_args(argv)
    given = {flag: getattr(args, flag) for flag in SHORTCUTS}
    overrides = {SHORTCUTS[flag]: value for flag, value in given.items() if value is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"sweepstream: error: --set {item}: expected SECTION.KEY=VALUE", file=sys.stderr)
            return 2
        overrides[key.strip()] = value.strip()
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"sweepstream: error: {exc}", file=sys.stderr)
        return 2
    if args.validate_config:
        from pipeline.config import to_toml

        print(to_toml(config), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s  supervisor %(levelname)s %(message)s")
    from pipeline.supervisor import Supervisor

    return Supervisor(config).run()


if __name__ == "__main__":
    sys.exit(main())
