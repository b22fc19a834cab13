#!/usr/bin/env python3
"""Write phantom blind-sweep cases in ACOUSLIC-AI's layout (installed as `sweepstream-make-phantom`; logic
in pipeline/evaluation/phantom_cases.py)."""

import sys

from pipeline.evaluation.phantom_cases import main

if __name__ == "__main__":
    sys.exit(main())
