"""What the command lines (``python -m pool predict``/``serve``/...) share: argument types,
each turning a string into a value or raising ``argparse.ArgumentTypeError`` naming what was
expected and what was given, and the :class:`pool.PredictionPool` options every command that
starts a pool takes (:data:`POOL_OPTIONS`, :func:`add_pool_options`, :func:`pool_options`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def runtime_name(text: str) -> str:
    from .runtimes import CHOICES  # no heavy import: names only

    if text not in CHOICES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(CHOICES)}, got {text!r}")
    return text


def precision_name(text: str) -> str:
    from .runtimes import PRECISIONS

    if text not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(PRECISIONS)}, got {text!r}")
    return text


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


#: The pool's options on the command line: (flag, PredictionPool keyword, type, help). Each
#: is passed to the pool only when given, so the pool's own defaults (and its refusal of
#: local-only options on a cluster) stay the one source of truth.
POOL_OPTIONS: tuple[tuple[str, str, Any, str, str], ...] = (
    (
        "--runtime",
        "runtime",
        runtime_name,
        "NAME",
        "what runs the model: tensorflow (default), openvino, onnxruntime, or auto (the fastest "
        "that converts and matches TensorFlow on this machine; docs/runtimes.md)",
    ),
    (
        "--precision",
        "precision",
        precision_name,
        "P",
        "f32 (default) or bf16 (OpenVINO's inference precision; with --runtime openvino/auto)",
    ),
    (
        "--threads-per-worker",
        "threads_per_worker",
        positive_int,
        "N",
        "TensorFlow intra-op threads per worker (default: 1; keep workers x threads <= cores)",
    ),
    (
        "--inter-op-threads",
        "inter_op_threads",
        positive_int,
        "N",
        "TensorFlow inter-op threads per worker (default: 1)",
    ),
    (
        "--timeout",
        "timeout",
        seconds,
        "SECONDS",
        "seconds one model call may run; past it the worker is replaced and the shards retried "
        "(default: none)",
    ),
    (
        "--max-retries",
        "max_retries",
        non_negative_int,
        "N",
        "re-runs of a shard whose worker died or timed out (default: 2)",
    ),
    (
        "--shard-size",
        "shard_size",
        positive_int,
        "N",
        "rows per shard: a larger call is split across workers (default: automatic)",
    ),
    (
        "--max-batch-rows",
        "max_batch_rows",
        positive_int,
        "N",
        "rows per model call when waiting shards are combined (default: 256)",
    ),
    (
        "--max-batch-bytes",
        "max_batch_bytes",
        positive_int,
        "BYTES",
        "input bytes per combined model call (default: 4 MiB)",
    ),
    (
        "--batch-timeout-micros",
        "batch_timeout_micros",
        non_negative_int,
        "MICROS",
        "wait this long for more shards before a smaller model call (default: 0)",
    ),
    (
        "--max-worker-memory",
        "max_worker_memory",
        positive_int,
        "BYTES",
        "RSS past which a worker is replaced after its model call (default: no limit)",
    ),
    (
        "--max-shards-per-worker",
        "max_shards_per_worker",
        positive_int,
        "N",
        "shards a worker answers before it is replaced (default: no limit)",
    ),
    (
        "--start-timeout",
        "start_timeout",
        seconds,
        "SECONDS",
        "seconds the workers have to load the model (default: 600)",
    ),
)


def add_pool_options(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """Add the pool's options (``POOL_OPTIONS``, and ``--pin-cpus``) to a command's parser;
    ``skip`` names flags the command defines its own way. Read them back with
    :func:`pool_options`."""
    group = parser.add_argument_group("pool options (see PredictionPool in docs/guide.md)")
    for flag, dest, kind, metavar, text in POOL_OPTIONS:
        if flag not in skip:
            group.add_argument(flag, dest=f"pool_{dest}", type=kind, metavar=metavar, help=text)
    if "--pin-cpus" not in skip:
        group.add_argument(
            "--pin-cpus",
            dest="pool_pin_cpus",
            action=argparse.BooleanOptionalAction,
            help="pin each worker to its own cores (default: where the OS allows it)",
        )


def pool_options(args: argparse.Namespace) -> dict[str, Any]:
    """The pool options given on the command line, as ``PredictionPool`` keywords."""
    prefix = "pool_"
    return {
        name[len(prefix) :]: value
        for name, value in vars(args).items()
        if name.startswith(prefix) and value is not None
    }
