#!/usr/bin/env python3
"""The demo with the live viewer off and on, back to back: latency and drops of both (installed as
`sweepstream-bench-viewer`; logic in pipeline/viewer/bench.py)."""

import sys

from pipeline.viewer.bench import main

if __name__ == "__main__":
    sys.exit(main())
