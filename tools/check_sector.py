#!/usr/bin/env python3
"""Sector-box error on synthetic machine screens and best-frame agreement screen vs raw stack (logic in
pipeline/sector_check.py; installed as `sweepstream-check-sector`)."""

import sys

from pipeline.sector_check import main

if __name__ == "__main__":
    sys.exit(main())
