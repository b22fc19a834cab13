#!/usr/bin/env python3
"""Build (or find in the cache) the TensorRT plan for a bundle on this machine's GPU (installed as
`sweepstream-build-engine`; logic in engines/export/build_engine.py)."""

import sys

from engines.export.build_engine import main

if __name__ == "__main__":
    sys.exit(main())
