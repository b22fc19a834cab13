#!/usr/bin/env python3
"""Write a Triton model repository (config.pbtxt with the dynamic batcher, the model) for a bundle
(installed as `sweepstream-export-triton`; logic in engines/export/triton.py)."""

import sys

from engines.export.triton import main

if __name__ == "__main__":
    sys.exit(main())
