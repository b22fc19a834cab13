#!/usr/bin/env python3
"""Capture latency (arrival -> ring) and reconnect time of a live stream on a real ffmpeg encoder (logic in
pipeline/capture_bench.py; installed as `sweepstream-bench-capture`)."""

import sys

from pipeline.capture_bench import main

if __name__ == "__main__":
    sys.exit(main())
