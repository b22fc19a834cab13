#!/usr/bin/env python3
"""Print a running pipeline's events as they happen (installed as `sweepstream-listen`; logic in
pipeline/listen.py)."""

import sys

from pipeline.listen import main

if __name__ == "__main__":
    sys.exit(main())
