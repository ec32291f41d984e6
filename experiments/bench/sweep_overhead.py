"""A whole sweep against its ideal: ``raysoup run`` as a user runs it, then every one of
its runs again alone.

- **wall**: ``raysoup run [CONFIG] --storage <scratch>`` in a fresh process, timed from
  outside: start-up, Ray, every trial, the soups and the printed table (the quickstart
  when no config is given).
- **work**: each planned run again, alone, in this process with one torch thread (what a
  trial with one CPU gets), into a scratch folder, from the sweep's own inputs (base, LP
  heads, auxiliary runs), after one untimed run (a reused worker has warm caches too).
  The base run does what the sweep's base trial did: copy this node's cached base network
  when there was one before the sweep (``base_cached``), else train it.
- **ideal** on ``--slots`` slots, respecting dependencies: ``lower_bound`` = the larger of
  total work / slots and the longest chain of dependent runs; ``plan_order`` = the
  makespan of raysoup's own scheduling (each free slot takes the next ready run in plan
  order) if runs cost exactly their work.

Reported: wall, work, both ideals and ``wall / ideal`` for each.

    python experiments/bench/sweep_overhead.py                  # the quickstart
    python experiments/bench/sweep_overhead.py my_sweep.yaml --slots 2
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import add_common_arguments, format_table, machine, script_parser, write_rows


def timed_sweep(config: Path | None, storage: Path) -> tuple[float, str]:
    """Seconds ``raysoup run`` takes in a fresh process, and the experiment name."""
    command = [sys.executable, "-m", "raysoup.cli", "run", "--storage", str(storage)]
    if config is not None:
        command.insert(4, str(config))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"raysoup run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    (name,) = [p.name for p in storage.iterdir() if not p.name.startswith(".")]
    return wall, name


def _spec(run: Any, out: Path) -> Any:
    from raysoup.options import from_mapping
    from raysoup.training.trainer import RunSpec

    plain = json.loads(json.dumps({**run.spec, "out": out}, default=str))
    return from_mapping(RunSpec, plain, run.key)


def run_alone(run: Any, out: Path, use_cache: bool) -> float:
    """Seconds ``run`` takes alone here, as its trial does it (a base run copies the cached
    base network if ``use_cache`` and there is one)."""
    from raysoup.training.trainer import adopt_cached_base, train_run

    spec = _spec(run, out)
    started = time.perf_counter()
    if not use_cache or adopt_cached_base(spec) is None:
        train_run(spec)
    return time.perf_counter() - started


def measure_work(runs: list[Any], scratch: Path, base_cached: bool) -> dict[str, float]:
    """``{key: seconds}`` of every run alone, with one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        warm = next((run for run in runs if run.stage != "base"), None)
        if warm is not None:
            run_alone(warm, scratch / "warm-up", base_cached)
        return {run.key: run_alone(run, scratch / run.key, base_cached) for run in runs}
    finally:
        torch.set_num_threads(threads)


def base_is_cached() -> bool:
    """Whether this node's cache holds the base network a one-CPU trial would train."""
    from raysoup.io.checkpoint import is_checkpoint
    from raysoup.training.trainer import base_cache_path

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return is_checkpoint(base_cache_path(torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("config", nargs="?", type=Path, default=None, help="sweep YAML")
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="trial slots")
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the sweep")
    add_common_arguments(parser, "sweep_overhead")
    args = parser.parse_args(argv)
    if args.slots < 1:
        parser.error(f"--slots {args.slots}: expected >= 1")
    if args.config is not None and not args.config.is_file():
        parser.error(f"config {str(args.config)!r} is not a file")

    from raysoup.sweep.plan import dependencies, plan_sweep
    from raysoup.sweep.record import read_config
    from raysoup.sweep.schedule import ideal_lower_bound, plan_order_makespan

    base_cached = base_is_cached()
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        workdir = args.workdir or Path(tmp)
        storage = workdir / "runs"
        storage.mkdir(parents=True, exist_ok=False)
        wall, name = timed_sweep(args.config, storage)
        root = storage / name
        plan = plan_sweep(read_config(root), root)
        runs = [run for stage in plan.values() for run in stage]
        print(f"sweep done in {wall:.1f} s; timing its {len(runs)} runs alone", file=sys.stderr)
        work = measure_work(runs, workdir / "alone", base_cached)
    waits_for = {run.key: dependencies(run, plan) for run in runs}
    order = [run.key for run in runs]
    lower = ideal_lower_bound(work, waits_for, args.slots)
    scheduled = plan_order_makespan(order, work, waits_for, args.slots)
    row = {
        "script": "sweep_overhead",
        "sweep": name,
        "runs": len(runs),
        "slots": args.slots,
        "base_cached": base_cached,
        "work_s": sum(work.values()),
        "lower_bound_s": lower,
        "plan_order_s": scheduled,
        "wall_s": wall,
        "wall_over_lower_bound_x": wall / lower,
        "wall_over_plan_order_x": wall / scheduled,
        **machine(torch.device("cpu")),
    }
    columns = [
        ("sweep", ""),
        ("runs", "d"),
        ("slots", "d"),
        ("base_cached", ""),
        ("work_s", ".1f"),
        ("lower_bound_s", ".1f"),
        ("plan_order_s", ".1f"),
        ("wall_s", ".1f"),
        ("wall_over_lower_bound_x", ".2f"),
        ("wall_over_plan_order_x", ".2f"),
    ]
    print(format_table([row], columns))
    print(f"rows: {write_rows([row], args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
