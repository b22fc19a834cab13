#!/usr/bin/env python3
"""Print a source's properties and its detected imaging sector as `x y w h` on the last line; --out draws it
on a frame (logic in pipeline/source_check.py; installed as `sweepstream-inspect-source`)."""

import sys

from pipeline.source_check import main

if __name__ == "__main__":
    sys.exit(main())
