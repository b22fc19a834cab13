#!/usr/bin/env python3
"""Start or stop a sweep by hand on a running pipeline (installed as `sweepstream-sweep-control`; logic in
pipeline/sweep_control.py)."""

import sys

from pipeline.sweep_control import main

if __name__ == "__main__":
    sys.exit(main())
