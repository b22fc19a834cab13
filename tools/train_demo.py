#!/usr/bin/env python3
"""Train the demo model on phantom sweeps and write its bundle, or --revalidate one (installed as
`sweepstream-train-demo`; logic in engines/export/demo_training/)."""

import sys

from engines.export.demo_training.cli import main

if __name__ == "__main__":
    sys.exit(main())
