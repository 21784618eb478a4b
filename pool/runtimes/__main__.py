"""Convert ahead of time: ``python -m pool.runtimes MODEL --runtime openvino``.

Fills the conversion cache (``$POOL_RUNTIME_CACHE``, else ``~/.cache/pool/runtimes``) exactly
as a pool's start would: converted, verified against TensorFlow, and with ``--runtime auto``
timed. Prints what a pool would run, as JSON. For container images and deployments: build the
cache once, on the same CPU type (the CPU's flags are part of the key).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from . import CHOICES, PRECISIONS
from .resolve import resolve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pool.runtimes", description=__doc__)
    parser.add_argument("model", help="a SavedModel directory")
    parser.add_argument("--runtime", choices=CHOICES, default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="f32")
    parser.add_argument("--signature", default="serving_default")
    parser.add_argument("--tolerance", type=float, default=None)
    parser.add_argument("--shard-size", type=int, default=None, help="rows per timed call (auto)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per conversion")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    resolution = resolve(
        os.path.abspath(args.model),
        args.signature,
        args.runtime,
        args.precision,
        args.tolerance,
        args.shard_size,
        args.timeout,
    )
    report = {
        "runtime": resolution.runtime,
        "requested": resolution.requested,
        "precision": resolution.precision,
        "artifact": resolution.artifact,
        **resolution.info,
    }
    print(json.dumps(report, indent=1, sort_keys=True))  # noqa: T201 (the command's output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
