"""File-job benchmark: ``predict --cluster`` (the workers read and write the files) against the
local CLI, rows/s and the client's peak RSS, at growing input sizes.

    python benchmarks/cluster_files.py [--rows 1000000 3000000] [--workers 2] [--format parquet]
                                       [--shard-size 1024] [--quick] [--keep]

The workload is the reference text-embedding model (``text`` string -> ``embedding``
float32[64]) on sentences of 4-32 pseudo-words: the model a file job of millions of rows runs
in practice (the small CNN's 12 KB image rows would make a 3M-row input 36 GB). For each size,
one input file (Parquet row groups of 100,000 rows, or CSV) is written, then two jobs run, each
as a fresh client process that measures its own peak RSS (``VmHWM`` of that process only: not
the workers):

1. ``local``: ``pool.etl.predict_file(model, IN, OUT, workers=N)``, the local CLI's job (the
   client reads every row, feeds its worker processes and writes every row);
2. ``cluster``: the same with ``cluster=ADDRESS`` on a ``LocalCluster(n_workers=N,
   threads_per_worker=1)`` started by this driver: the client plans partitions and the
   workers read, predict and write (``pool/cluster/files.py``).

Rows/s are the jobs' own (rows over the time after the workers were ready) and over the client's
whole wall time, start-up included. The two outputs are compared row by row (ids equal, the
embeddings ``np.allclose``), a batch at a time; a run whose outputs differ exits with status 2.
Target (reported, not asserted): the cluster client's peak RSS flat from the smallest to the
largest size (at most 1.1x). Writes ``cluster_files.json`` and ``cluster_files.md`` to
``--output-dir`` (default ``benchmarks/results``); ``--quick`` is a smoke run at 20,000 and
60,000 rows (figures not meaningful).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # benchmarks/ is on sys.path as the script's directory
import numpy as np

log = logging.getLogger("cluster_files_benchmark")

DEFAULT_OUTPUT_DIR = common.HERE / "results"
ROW_GROUP = 100_000
FLAT_TARGET = 1.1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--rows", type=int, nargs="+", default=None, help="default 1000000 3000000")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the input and output files")
    p.add_argument("--quick", action="store_true", help="smoke run: 20000 and 60000 rows")
    p.add_argument(
        "--child", nargs=4, metavar=("MODEL", "IN", "OUT", "CLUSTER"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    args.rows = args.rows or ([20_000, 60_000] if args.quick else [1_000_000, 3_000_000])
    args.output_dir = args.output_dir or DEFAULT_OUTPUT_DIR
    return args


# --- the client process (one job) -------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    """Run one file job in this process; print its figures as JSON on stdout."""
    from pool import etl

    model, source, target, cluster = args.child
    started = time.perf_counter()
    where = {"cluster": cluster} if cluster != "-" else {"workers": args.workers}
    report = etl.predict_file(
        model,
        source,
        target,
        columns="text",
        shard_size=args.shard_size,
        overwrite=True,
        **where,
    )
    wall = time.perf_counter() - started
    peak = peak_rss()
    figures = {
        "rows": report.rows,
        "chunks": report.chunks,
        "job_seconds": report.seconds,
        "wall_seconds": wall,
        "rows_per_second": report.rows_per_second,
        "rows_per_second_wall": report.rows / wall,
        "client_peak_rss_bytes": peak,
    }
    sys.stdout.write(json.dumps(figures) + "\n")


def peak_rss() -> int:
    """This process's peak resident set, bytes: ``VmHWM`` (``ru_maxrss`` would be no good: Linux
    keeps it across ``exec``, so a child starts with its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB


def run_job(
    args: argparse.Namespace, model: str, source: Path, target: Path, cluster: str
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--shard-size",
        str(args.shard_size),
        "--workers",
        str(args.workers),
        "--child",
        model,
        str(source),
        str(target),
        cluster,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the job failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- inputs and checks ------------------------------------------------------------------------


def write_input(path: Path, rows: int, fmt: str, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    writer: Any = None
    try:
        for start in range(0, rows, ROW_GROUP):
            count = min(ROW_GROUP, rows - start)
            batch = pa.table(
                {
                    "id": pa.array(np.arange(start, start + count), pa.int64()),
                    "text": pa.array(common.sentences(rng, count), pa.string()),
                }
            )
            if fmt == "parquet":
                if writer is None:
                    writer = pq.ParquetWriter(path, batch.schema)
                writer.write_table(batch)
            else:
                if writer is None:
                    writer = pacsv.CSVWriter(path, batch.schema)
                writer.write_table(batch)
    finally:
        if writer is not None:
            writer.close()


def same_outputs(a: Path, b: Path, fmt: str) -> bool:
    """Ids equal and embeddings close, a batch at a time (memory stays small)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        left = pq.ParquetFile(a).iter_batches(65536, columns=["id", "embedding"])
        right = pq.ParquetFile(b).iter_batches(65536, columns=["id", "embedding"])
        for x, y in zip(left, right, strict=True):
            if x.column("id") != y.column("id"):
                return False
            ex = np.stack(x.column("embedding").to_numpy(zero_copy_only=False))
            ey = np.stack(y.column("embedding").to_numpy(zero_copy_only=False))
            if not np.allclose(ex, ey, rtol=1e-5, atol=1e-6):
                return False
        return True
    return a.read_bytes() == b.read_bytes()


# --- the driver -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    common.setup_logging()
    import distributed

    model = common.reference_model("text_embedding")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pool-cluster-files-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "benchmark": "cluster_files",
        "command": common.command_line(argv),
        "when": common.now(),
        "revision": common.git_revision(),
        "machine": common.describe_machine(),
        "model": "text_embedding",
        "format": args.format,
        "workers": args.workers,
        "shard_size": args.shard_size,
        "runs": [],
    }
    cluster = distributed.LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    status = 0
    try:
        for rows in args.rows:
            source = workdir / f"in-{rows}.{args.format}"
            log.info("writing %d rows to %s", rows, source)
            write_input(source, rows, args.format, args.seed)
            outputs = {}
            for config, address in (("local", "-"), ("cluster", cluster.scheduler_address)):
                target = workdir / f"out-{rows}-{config}.{args.format}"
                log.info("%s: %d rows", config, rows)
                figures = run_job(args, model, source, target, address)
                figures.update(config=config, input_rows=rows, input_bytes=source.stat().st_size)
                log.info(
                    "%s: %.0f rows/s (%.0f with start-up), client peak RSS %.0f MB",
                    config,
                    figures["rows_per_second"],
                    figures["rows_per_second_wall"],
                    figures["client_peak_rss_bytes"] / 1e6,
                )
                results["runs"].append(figures)
                outputs[config] = target
            same = same_outputs(outputs["local"], outputs["cluster"], args.format)
            results["runs"][-1]["same_as_local"] = same
            if not same:
                log.error("the cluster job's output differs from the local job's at %d rows", rows)
                status = 2
            if not args.keep:
                for path in (source, *outputs.values()):
                    path.unlink(missing_ok=True)
    finally:
        cluster.close()
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["targets"] = targets(results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "cluster_files.json").write_text(
        json.dumps(results, indent=1, default=common.json_default) + "\n"
    )
    text = markdown(results)
    (args.output_dir / "cluster_files.md").write_text(text)
    sys.stdout.write(text)
    return status


def targets(results: dict[str, Any]) -> dict[str, Any]:
    runs = [r for r in results["runs"] if r["config"] == "cluster"]
    if len(runs) < 2:
        return {}
    small, large = min(runs, key=lambda r: r["rows"]), max(runs, key=lambda r: r["rows"])
    ratio = large["client_peak_rss_bytes"] / small["client_peak_rss_bytes"]
    return {
        "cluster client peak RSS, largest / smallest input": {
            "value": ratio,
            "target": FLAT_TARGET,
            "pass": ratio <= FLAT_TARGET,
        }
    }


def markdown(results: dict[str, Any]) -> str:
    cpu = results["machine"].get("cpu_model", "?")
    lines = [
        "# File job: `predict --cluster` against the local CLI",
        "",
        f"`{results['command']}` on {results['when']} ({cpu}); "
        f"text_embedding, {results['format']}, {results['workers']} workers, shards of "
        f"{results['shard_size']} rows.",
        "",
        "| rows | job | rows/s (workers ready) | rows/s (wall, start-up included) "
        "| client peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['rows']:,} | {r['config']} | {r['rows_per_second']:,.0f} | "
            f"{r['rows_per_second_wall']:,.0f} | {r['client_peak_rss_bytes'] / 1e6:,.0f} |"
        )
    lines.append("")
    for name, target in results.get("targets", {}).items():
        verdict = "PASS" if target["pass"] else "MISS"
        lines.append(f"- {name}: {target['value']:.2f} (target ≤ {target['target']}): {verdict}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
