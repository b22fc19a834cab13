#!/usr/bin/env python3
"""Batch latency and accuracy of each inference backend on one bundle (installed as
`sweepstream-bench-engine`; logic in engines/benchmark.py)."""

import sys

from engines.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
