"""Helpers shared by the benchmark scripts: device choice, timing, text tables, Parquet rows.

Every script prints its figures side by side (ratios are measured in one run, so a noisy
shared machine slows all of them alike) and writes one Parquet row per figure, atomically
(temporary sibling, fsync, rename: ``raysoup.io.atomic.atomic_write_bytes``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from raysoup.devices import resolve_device
from raysoup.errors import RaysoupError

DEVICES = ("auto", "cpu", "cuda")
RESULTS_DIR = Path("bench-results")
Row = dict[str, Any]


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the script's docstring (first line, then the rest)."""
    return argparse.ArgumentParser(
        description=doc.splitlines()[0],
        epilog="\n".join(doc.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def start_local_ray(tmp: Path, cpus: int, gpus: int = 0) -> None:
    """A private local Ray instance (own temp dir: never a stale cluster from /tmp/ray)."""
    from raysoup.sweep.cluster import LOCAL, connect

    connect(LOCAL, num_cpus=cpus, num_gpus=gpus, log_to_driver=False, _temp_dir=str(tmp))


def device_from_args(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``raysoup.devices.resolve_device``; a device this machine lacks is the parser's error."""
    try:
        return resolve_device(name)
    except RaysoupError as error:
        parser.error(str(error))


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_common_arguments(parser: argparse.ArgumentParser, script: str) -> None:
    """``--out`` (Parquet file of the rows) and ``--device``."""
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / f"{script}.parquet",
        help="Parquet file the rows are written to, atomically (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where merges and soup evaluations run; auto = CUDA when available",
    )


def machine(device: torch.device) -> Row:
    """What the figures were measured on (copied into every row)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {
        "device": str(device),
        "device_name": name,
        "cpus": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation), NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``rows`` as one Parquet file, atomically; returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysoup.io.atomic import atomic_write_bytes

    if not rows:
        raise ValueError(f"no rows to write to {path}")
    table = pa.Table.from_pylist([dict(row) for row in rows])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = Path(path)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return path


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: ``columns`` are ``(key, format spec)``; text left, numbers right."""
    header = [key for key, _ in columns]
    body = [[_cell(row.get(key), fmt) for key, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    numeric = [
        any(isinstance(row.get(key), (int, float)) for row in rows) and not fmt.startswith("s")
        for key, fmt in columns
    ]
    lines = []
    for line in [header, *body]:
        cells = [
            cell.rjust(width) if is_number else cell.ljust(width)
            for cell, width, is_number in zip(line, widths, numeric, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
