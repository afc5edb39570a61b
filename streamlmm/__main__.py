"""``python -m streamlmm``: the ``streamlmm`` command."""

from __future__ import annotations

import sys

from streamlmm.cli import main

if __name__ == "__main__":
    sys.exit(main())
