#!/usr/bin/env python3
"""Build a FetalCLIP model bundle from a checkpoint, heads and prompts (installed as
`sweepstream-build-bundle`; logic in engines/export/build_bundle.py)."""

import sys

from engines.export.build_bundle import main

if __name__ == "__main__":
    sys.exit(main())
