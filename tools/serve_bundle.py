#!/usr/bin/env python3
"""Serve a bundle over KServe v2, gRPC and HTTP (installed as `sweepstream-serve-bundle`; logic in
engines/serve.py)."""

import sys

from engines.serve import main

if __name__ == "__main__":
    sys.exit(main())
