"""``python -m fednode``: the ``fednode`` command."""

from __future__ import annotations

import sys

from fednode.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
