"""The command line: ``python -m pool predict MODEL --input IN --output OUT`` (also ``tf-pool``).

``predict`` streams a Parquet, CSV or ``.npy`` file through a :class:`pool.PredictionPool` into
a new file with :func:`pool.etl.predict_file`. It writes nothing to stdout: the progress bar, the
summary and errors go to stderr, so stdout stays free for the caller. ``inspect MODEL`` prints
the model's signatures (inputs, outputs, dtypes, shapes, what to pass to ``--column``) to
stdout without starting workers, read from ``saved_model.pb`` without TensorFlow where it can.
``--version`` prints the distribution's version. Exit status:

- 0: the output is complete;
- 1: the job failed while running (the model failed to load or raised, an I/O error);
- 2: the command cannot run as given (bad option, missing input, unknown column, a column that
  does not fit the model, a value out of its input's range, an existing output without
  ``--overwrite``, unwritable output, a resume that does not match, a ``--cluster`` worker
  that cannot see the input or the output's directory), reported in one
  line ``error: ...``, before any worker starts where the check does not need the model;
- 130 / 143: interrupted by Ctrl-C / SIGTERM; committed chunks are kept for ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__, etl
from .argtypes import add_pool_options, pool_options, positive_int
from .messages import STRING, SignatureInfo, TensorInfo
from .runtimes import __main__ as runtimes_command
from .savedmodel_pb import not_a_savedmodel
from .serve import command as serve_command
from .worker import TF_LOGS_VARIABLE

log = logging.getLogger("pool")

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class _UsageError(Exception):
    """Raised by the parser instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so the job cleans up as for Ctrl-C."""


def _pairs(values: Sequence[str] | None, option: str) -> Any:
    """``--column text`` -> ``"text"``; ``a b`` -> ``["a", "b"]``; ``a=x b=y,z`` -> a mapping."""
    if not values:
        return None
    if not any("=" in v for v in values):
        return values[0] if len(values) == 1 else list(values)
    if not all("=" in v for v in values):
        raise _UsageError(f"{option}: use either NAME or INPUT=NAME forms, not both")
    mapping: dict[str, Any] = {}
    for value in values:
        key, _, name = value.partition("=")
        if not key or not name:
            raise _UsageError(f"{option}: expected INPUT=NAME, got {value!r}")
        if key in mapping:
            raise _UsageError(f"{option}: {key!r} given twice")
        names = name.split(",")
        mapping[key] = names[0] if len(names) == 1 else names
    return mapping


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m pool",
        description="Fast TensorFlow / TF Hub inference on CPU with a process pool.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    predict = commands.add_parser(
        "predict",
        help="predict every row of a Parquet, CSV or .npy file into a new file",
        description=(
            "Stream INPUT through MODEL into OUTPUT, keeping the input's rows and order and "
            "adding one column per model output. OUTPUT appears only complete (atomic rename); "
            "after a crash or Ctrl-C, --resume continues from the last committed chunk."
        ),
        epilog="Exit status: 0 done, 1 failed while running, 2 bad arguments or data, "
        "130 interrupted by Ctrl-C, 143 stopped by SIGTERM (committed chunks are kept for "
        "--resume). See docs/etl.md.",
    )
    predict.add_argument("model", metavar="MODEL", help="SavedModel directory or TF Hub handle")
    predict.add_argument("--input", "-i", required=True, help="input file: .parquet, .csv, .npy")
    predict.add_argument("--output", "-o", required=True, help="output file: .parquet, .csv, .npy")
    predict.add_argument(
        "--column",
        "-c",
        action="append",
        metavar="[INPUT=]COLUMN",
        help="column feeding the model's input (default: the column named like the input); "
        "repeat as INPUT=COLUMN for several inputs, INPUT=C1,C2 to stack columns",
    )
    predict.add_argument(
        "--output-column",
        action="append",
        metavar="[OUTPUT=]COLUMN",
        help="name of the new column (default: the model output's name); OUTPUT=COLUMN to "
        "rename several",
    )
    predict.add_argument(
        "--workers", "-w", type=positive_int, help="worker processes (default: cores)"
    )
    predict.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run on the workers of a Dask cluster, e.g. tcp://10.0.0.5:8786: they read the "
        "input and write the output themselves, so both must be on storage every worker sees "
        "(needs pip install 'prediction-pool[dask]'; see docs/etl.md)",
    )
    predict.add_argument(
        "--shard-size", type=positive_int, help="rows per shard (default: automatic)"
    )
    predict.add_argument(
        "--chunk-rows",
        type=positive_int,
        help="rows per committed chunk and output row group (default: about 32 MB of rows)",
    )
    predict.add_argument(
        "--max-in-flight", type=positive_int, help="shards submitted ahead (default: 4 per worker)"
    )
    predict.add_argument("--signature", default="serving_default", help="signature to call")
    predict.add_argument("--model-output", help="keep only this output of the model")
    predict.add_argument("--input-format", choices=["parquet", "csv", "npy"])
    predict.add_argument("--output-format", choices=["parquet", "csv", "npy"])
    predict.add_argument(
        "--resume", action="store_true", help="continue an interrupted job into the same OUTPUT"
    )
    predict.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT if it exists (else: exit 2)"
    )
    predict.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (it is shown only when stderr is a terminal)",
    )
    add_pool_options(predict, skip=("--shard-size",))
    verbosity = predict.add_mutually_exclusive_group()
    verbosity.add_argument(
        "--verbose",
        "-v",
        action="count",
        default=0,
        help="log progress (-vv: and tracebacks, and TensorFlow's start-up lines from workers)",
    )
    verbosity.add_argument("--quiet", "-q", action="store_true", help="print errors only")
    inspect = commands.add_parser(
        "inspect",
        help="show a model's signatures: inputs, outputs, dtypes, shapes, what --column takes",
        description=(
            "Print MODEL's signatures to stdout without starting workers: each input and output "
            "with its dtype and shape, and the --column options that feed it. A local "
            "SavedModel is read without TensorFlow; a TF Hub handle is loaded with it."
        ),
    )
    inspect.add_argument("model", metavar="MODEL", help="SavedModel directory or TF Hub handle")
    inspect.add_argument("--signature", help="show only this signature")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    serve_command.add_parser(commands)  # python -m pool serve: pool/serve/command.py
    compile_parser = commands.add_parser(
        "compile",
        help="convert a model for --runtime ahead of time and verify it (docs/runtimes.md)",
        description=runtimes_command.DESCRIPTION,
    )
    runtimes_command.add_arguments(compile_parser)
    return parser


def _fail(code: int, message: str) -> int:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    sys.stderr.write(f"error: {first}\n")
    return code


def _predict(args: argparse.Namespace) -> int:
    columns = _pairs(args.column, "--column")
    output_column = _pairs(args.output_column, "--output-column")
    if isinstance(output_column, list):
        raise _UsageError("--output-column: give one NAME, or OUTPUT=NAME for each output")
    started = time.perf_counter()
    report = etl.predict_file(
        args.model,
        args.input,
        args.output,
        columns=columns,
        output_column=output_column,
        workers=args.workers,
        shard_size=args.shard_size,
        chunk_rows=args.chunk_rows,
        max_in_flight=args.max_in_flight,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=args.progress and not args.quiet,
        input_format=args.input_format,
        output_format=args.output_format,
        signature=args.signature,
        model_output=args.model_output,
        **({"cluster": args.cluster} if args.cluster else {}),
        **pool_options(args),
    )
    if not args.quiet:
        sys.stderr.write(_summary(report, time.perf_counter() - started) + "\n")
    return 0


def _summary(report: Any, wall_seconds: float) -> str:
    """One line: rows, output, wall time with start-up, and the rate once workers were ready."""
    resumed = f"; {report.resumed_chunks} chunk(s) resumed" if report.resumed_chunks else ""
    rate = (
        f"{report.rows_per_second:,.0f} rows/s once the workers were ready"
        if report.computed_rows
        else "nothing left to compute"
    )
    return (
        f"wrote {report.rows:,} rows to {report.output} in {wall_seconds:.1f} s, worker "
        f"start-up included ({rate}{resumed})"
    )


def _kept_note(output: str) -> str:
    """What a failed job left in ``.OUT.partial/``, for its error line ("" if nothing)."""
    partial = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.partial")
    try:
        parts = [n for n in os.listdir(partial) if n.startswith("part-")]
    except OSError:
        return ""
    if not parts:
        return ""
    return (
        f"; {partial}/ keeps the {len(parts)} chunk(s) committed before the error: --resume "
        "continues from them while the input and options are unchanged, a run without it "
        "discards them"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(EXIT_USAGE, f"{exc} (see --help)")
    if args.version:
        sys.stdout.write(f"prediction-pool {__version__}\n")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "serve":  # its own logging and signals; imports the web stack lazily
        return serve_command.run(args)
    if args.command == "compile":  # converts in a subprocess; this process stays TF-free
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return runtimes_command.run(args)
    levels = [logging.WARNING, logging.INFO, logging.DEBUG]
    level = logging.ERROR if args.quiet else levels[min(args.verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    previous_level = log.level
    log.setLevel(level)
    # -vv: workers and the fork server show TensorFlow's C++ start-up lines (docs/guide.md)
    tf_logs = args.verbose >= 2 and TF_LOGS_VARIABLE not in os.environ
    if tf_logs:
        os.environ[TF_LOGS_VARIABLE] = "1"

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminated

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_term = signal.signal(signal.SIGTERM, terminate) if in_main_thread else None
    try:
        return _predict(args)
    except _UsageError as exc:
        return _fail(EXIT_USAGE, f"{exc} (see --help)")
    except etl.EtlError as exc:
        return _fail(EXIT_USAGE, f"{exc}{_kept_note(args.output)}")
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, _interrupted(args))
    except _Terminated:
        return _fail(EXIT_TERMINATED, _interrupted(args, "terminated"))
    except Exception as exc:  # PoolError (model load, worker), OSError, ...: a runtime failure
        log.debug("the job failed", exc_info=True)
        return _fail(EXIT_RUNTIME, f"{type(exc).__name__}: {exc}{_kept_note(args.output)}")
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        log.removeHandler(handler)
        log.setLevel(previous_level)
        if tf_logs:
            os.environ.pop(TF_LOGS_VARIABLE, None)


def _interrupted(args: argparse.Namespace, how: str = "interrupted") -> str:
    return (
        f"{how}; {args.output} was not written, committed chunks are kept: rerun with "
        "--resume to continue"
    )


# --- inspect ----------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    try:
        signatures, source = _signatures(args.model, args.signature)
    except etl.EtlError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except Exception as exc:  # TensorFlow could not load the model
        return _fail(EXIT_RUNTIME, f"{type(exc).__name__}: {exc}")
    if args.signature is not None:
        signatures = {args.signature: signatures[args.signature]}
    if args.json:
        described = {
            name: None
            if info is None
            else {"inputs": _tensors_json(info.inputs), "outputs": _tensors_json(info.outputs)}
            for name, info in signatures.items()
        }
        document = {"model": args.model, "source": source, "signatures": described}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        sys.stdout.write(_inspect_text(args.model, source, signatures))
    return 0


def _signatures(model: str, wanted: str | None) -> tuple[dict[str, SignatureInfo | None], str]:
    """The model's signatures (serving_default first) and where they were read from.

    ``saved_model.pb`` without TensorFlow when it describes what is asked; else the model is
    loaded with TensorFlow in this process (a TF Hub handle, sparse or composite tensors)."""
    remote = "://" in model
    reason = not_a_savedmodel(model)
    if reason is not None:
        raise etl.EtlError(f"model {model!r} is not a SavedModel directory ({reason})")
    found = etl.read_signatures(model)
    name = wanted or "serving_default"
    if found is not None and wanted is not None and wanted not in found:
        raise etl.EtlError(f"the model has no signature {wanted!r}; it has {sorted(found)}")
    if found is not None and (found.get(name) is not None or (wanted is None and found)):
        first = {"serving_default": found.pop("serving_default")} if name in found else {}
        return {**first, **dict(sorted(found.items()))}, "saved_model.pb"
    from . import model as tf_model  # imports TensorFlow: only when the file is not enough

    path = tf_model.resolve(model) if remote else model
    return {name: tf_model.load(path, name, None).signature}, "tensorflow"


def _tensors_json(tensors: tuple[TensorInfo, ...] | None) -> list[dict[str, Any]] | None:
    if tensors is None:
        return None
    return [
        {"name": t.name, "dtype": t.dtype, "shape": None if t.shape is None else list(t.shape)}
        for t in tensors
    ]


def _per_row(t: TensorInfo) -> str:
    """What one row of this input is, and which column(s) can hold it."""
    if t.shape is None:
        return "any shape"
    what = "text" if t.dtype == STRING else f"{t.dtype} value"
    rest = t.shape[1:]
    if not rest:
        return f"one {what} per row: a {'string' if t.dtype == STRING else 'numeric'} column"
    if len(rest) == 1 and rest[0] is not None:
        k = rest[0]
        names = ",".join(f"C{i}" for i in range(1, k + 1)) if k <= 4 else f"C1,...,C{k}"
        return f"{k} {what}s per row: a list column of {k}, or {k} columns: {t.name}={names}"
    dims = "x".join("?" if d is None else str(d) for d in rest)
    return f"{dims} {what}s per row: a nested list column (Parquet) or a .npy array"


def _column_of(t: TensorInfo) -> str:
    """What column of a Parquet or CSV output this output becomes."""
    if t.shape is None:
        return ""
    rest = list(t.shape[1:])
    if rest[-1:] == [1]:  # a trailing axis of size 1 is dropped
        rest = rest[:-1]
        dropped = " (its axis of size 1 dropped)"
    else:
        dropped = ""
    what = "text" if t.dtype == STRING else "number"
    if not rest:
        return f"a {what} column{dropped}"
    if len(rest) == 1:
        size = f"of {rest[0]} " if rest[0] is not None else "of "
        return f"a list column {size}{what}s (CSV: a JSON array){dropped}"
    return f"a nested list column (CSV: a JSON array){dropped}"


def _inspect_text(model: str, source: str, signatures: dict[str, SignatureInfo | None]) -> str:
    how = (
        "read from saved_model.pb, without TensorFlow"
        if source == "saved_model.pb"
        else "loaded with TensorFlow"
    )
    lines = [f"model: {model} ({how})"]
    for name, info in signatures.items():
        lines.append("")
        flag = "" if name == "serving_default" else f" --signature {name}"
        lines.append(f"signature {name!r}" + (" (the default)" if not flag else f" ({flag[1:]})"))
        if info is None:
            lines.append(
                "  sparse or composite tensors: not described without TensorFlow; "
                f"python -m pool inspect MODEL --signature {name}"
            )
            continue
        for side, tensors in (("inputs", info.inputs), ("outputs", info.outputs)):
            lines.append(f"  {side}:")
            if tensors is None:
                lines.append("    (not declared)")
                continue
            width = max(len(t.describe()) for t in tensors)
            for t in tensors:
                hint = _per_row(t) if side == "inputs" else _column_of(t)
                lines.append(f"    {t.describe():<{width}}   {hint}".rstrip())
        inputs = [t.name for t in info.inputs or ()]
        if len(inputs) == 1:
            option = "--column COLUMN"
            default = f"the column named {inputs[0]!r}, or the only column"
        else:
            option = " ".join(f"--column {n}=COLUMN" for n in inputs)
            default = "the columns named " + " and ".join(repr(n) for n in inputs)
        lines.append(f"  predict: python -m pool predict MODEL -i IN -o OUT {option}{flag}")
        lines.append(f"           (without --column: {default})")
    return "\n".join(lines) + "\n"
