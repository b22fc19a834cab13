#!/usr/bin/env python3
"""List V4L2 capture devices with their formats (logic in pipeline/devices.py; installed as
`sweepstream-list-devices`)."""

import sys

from pipeline.devices import main

if __name__ == "__main__":
    sys.exit(main())
