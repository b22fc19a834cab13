#!/usr/bin/env python3
"""On a GPU machine: torch-CUDA and TensorRT end to end on the reference and a ViT-L bundle, one report
(installed as `sweepstream-gpu-check`; logic in engines/gpu_check.py)."""

import sys

from engines.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
