"""``python -m pool``: the command line of :mod:`pool.cli`."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
