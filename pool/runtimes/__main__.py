"""Convert ahead of time: ``python -m pool compile MODEL --runtime openvino`` (the same as
``python -m pool.runtimes MODEL ...``).

Fills the conversion cache (``$POOL_RUNTIME_CACHE``, else ``~/.cache/pool/runtimes``) exactly
as a pool's start would: converted, verified against TensorFlow, and with ``--runtime auto``
timed. Prints what a pool would run, as JSON: the runtime, the artifact, the measured
differences to TensorFlow per output, and ``auto``'s timings or the reason it fell back. For
container images and deployments: build the cache once, on the same CPU type (the CPU's flags
are part of the key). Exit status: 0 converted (or fallen back, with ``auto``); 1 the
conversion or its verification failed; 2 bad arguments or a MODEL that is not a SavedModel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ..argtypes import positive_int, precision_name, runtime_name, seconds
from ..errors import PoolError
from ..savedmodel_pb import not_a_savedmodel
from .resolve import resolve

DESCRIPTION = (
    "Convert MODEL for a runtime ahead of time, verify it against TensorFlow and fill the "
    "cache a pool's start reads; print what a pool would run as JSON (docs/runtimes.md)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a SavedModel directory")
    parser.add_argument(
        "--runtime", type=runtime_name, default="auto", help="default: auto (every one installed)"
    )
    parser.add_argument("--precision", type=precision_name, default="f32", help="default: f32")
    parser.add_argument("--signature", default="serving_default")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest accepted difference to TensorFlow, relative to each output's scale "
        "(default: 1e-4 for f32, 5e-2 for bf16)",
    )
    parser.add_argument(
        "--shard-size", type=positive_int, default=None, help="rows per timed call (auto)"
    )
    parser.add_argument(
        "--timeout", type=seconds, default=None, help="seconds the conversion may take"
    )


def run(args: argparse.Namespace) -> int:
    """Convert as ``args`` say; print the report; return the exit status."""
    reason = not_a_savedmodel(args.model)
    if reason is not None or "://" in args.model:
        why = reason or "a handle: download it and pass its directory"
        sys.stderr.write(f"error: model {args.model!r} is not a SavedModel directory ({why})\n")
        return 2
    try:
        resolution = resolve(
            os.path.abspath(args.model),
            args.signature,
            args.runtime,
            args.precision,
            args.tolerance,
            args.shard_size,
            args.timeout,
        )
    except (PoolError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or ["failed"])[0]
        sys.stderr.write(f"error: {type(exc).__name__}: {first}\n")
        return 1
    report = {
        "runtime": resolution.runtime,
        "requested": resolution.requested,
        "precision": resolution.precision,
        "artifact": resolution.artifact,
        **resolution.info,
    }
    sys.stdout.write(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pool.runtimes", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
