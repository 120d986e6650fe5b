"""``python -m lbclient``: the command-line tools, which live in :mod:`lbclient.cli`."""

from __future__ import annotations

import sys

from lbclient.cli import main

if __name__ == "__main__":
    sys.exit(main())
