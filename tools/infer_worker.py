#!/usr/bin/env python3
"""Serve a run's inference from another machine (installed as `sweepstream-infer-worker`; logic in
pipeline/infer_worker.py)."""

import sys

from pipeline.infer_worker import main

if __name__ == "__main__":
    sys.exit(main())
