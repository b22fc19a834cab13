#!/usr/bin/env python3
"""Train FetalCLIP's quality head (LoRA) and mask decoder on ACOUSLIC-format cases and write a heads file
for tools/build_bundle.py --heads (installed as `sweepstream-train-heads`; logic in
engines/export/demo_training/)."""

import sys

from engines.export.demo_training.heads_cli import main

if __name__ == "__main__":
    sys.exit(main())
