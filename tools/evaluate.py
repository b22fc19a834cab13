#!/usr/bin/env python3
"""Score ACOUSLIC-AI predictions, or run the pipeline over cases and score it (installed as
`sweepstream-evaluate`; logic in pipeline/evaluation/)."""

import sys

from pipeline.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
