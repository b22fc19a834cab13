#!/usr/bin/env python3
"""Add a gated INT8 model to an existing bundle (installed as `sweepstream-quantize-bundle`; logic in
engines/export/quantize_bundle.py)."""

import sys

from engines.export.quantize_bundle import main

if __name__ == "__main__":
    sys.exit(main())
