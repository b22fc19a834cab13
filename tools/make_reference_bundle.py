#!/usr/bin/env python3
"""Build the reference model bundle, a small real ONNX model that needs no torch (installed as
`sweepstream-make-reference-bundle`; logic in engines/export/reference_bundle.py)."""

import sys

from engines.export.reference_bundle import main

if __name__ == "__main__":
    sys.exit(main())
