#!/usr/bin/env python3
"""A long run with injected stage restarts, reporting memory and file descriptors per process (installed
as `sweepstream-soak`; logic in pipeline/soak.py)."""

import sys

from pipeline.soak import main

if __name__ == "__main__":
    sys.exit(main())
