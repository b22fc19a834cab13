#!/usr/bin/env python3
"""Per-frame latency through a KServe v2 server (gRPC, HTTP) against local ONNX Runtime, in one run
(installed as `sweepstream-bench-kserve`; logic in engines/kserve_bench.py)."""

import sys

from engines.kserve_bench import main

if __name__ == "__main__":
    sys.exit(main())
