#!/usr/bin/env python3
"""Measure what the multi-process pipeline costs over doing the same work in one loop (see
pipeline/benchmark.py; installed as `sweepstream-bench-latency`)."""

import sys

from pipeline.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
