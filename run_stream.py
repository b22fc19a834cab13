#!/usr/bin/env python3
"""sweepstream from a checkout: the same command as the installed `sweepstream` (logic in pipeline/cli.py).

With no arguments it runs the demo: phantom blind sweeps streamed live through the demo bundle.
`python run_stream.py --help` lists every option.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
