#!/usr/bin/env python3
"""Make CurveZMQ keys for a run and its clients (installed as `sweepstream-keys`; logic in
pipeline/security.py)."""

import sys

from pipeline.security import main

if __name__ == "__main__":
    sys.exit(main())
