"""Orchestration overhead: many short trials on Ray Tune, with and without the soup actor.

The target stage of a real sweep (``SweepConfig`` with one init and ``--trials`` hparams
seeds of the built-in MiniRotatedMNIST, ``--steps`` training steps per trial, so about a
second of real work each) runs twice on one local Ray instance, through raysoup's own
code path (``run_runs`` with the ``run_trial`` trainable: training, checkpoint, Parquet
row, Tune checkpoint):

- ``without``: the target stage alone;
- ``with``: as ``run_sweep`` runs it: ``start_soup`` (the soup actor), the stage with the
  ``SoupFeeder`` callback, ``hand_over`` and ``finalize`` (all soups written);
- ``fresh-workers``: ``without`` with ``reuse_workers: false``, what raysoup did before
  it reused Tune's workers: one fresh worker process (importing torch and raysoup) per
  trial instead of a few long-lived ones.

Reported: the wall time of each, the ideal ``total work / slots`` (work = the same trial
run standalone in this process, ``--calibrate`` of them after one untimed, before and
again after the sweeps, median of both), the overhead ratio ``wall / ideal``, the same
against the work the trials measured themselves (their ``wall_s``, slowed by whatever
shared the CPUs), and for ``with``: the soups' own work measured alone (``soup_work_s``:
the actor's ``SoupMaker`` souping the same finished trials post hoc in this process, one
torch thread, every soup written), which shares the slots (``overhead_with_soup_work_x``
is the wall against ``ideal_with_soup_s`` = ideal + soup work / slots), the soup actor's
CPU seconds (its work while streaming: re-decisions, start-up) and the soup tail: from
the end of the stage to the final soups. The base network comes from the raysoup
cache and the LP head is trained once here: neither is timed.

    python experiments/bench/orchestration.py
    python experiments/bench/orchestration.py --trials 100 --modes without with
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import (
    add_common_arguments,
    device_from_args,
    format_table,
    machine,
    median,
    script_parser,
    start_local_ray,
    write_rows,
)

MODES = ("without", "with", "fresh-workers")
LP_STEPS = 20


def sweep_config(
    name: str, trials: int, steps: int, device: torch.device, reuse_workers: bool = True
) -> Any:
    """The benchmark sweep: one group of ``trials`` short pretrained-init trials."""
    from raysoup.sweep.config import SweepConfig

    gpu = device.type == "cuda"
    return SweepConfig(
        name=name,
        n_hparams=trials,
        inits=["pretrained"],
        aux_datasets=[],
        steps=steps,
        checkpoint_freq=steps,
        lp_stage_steps=LP_STEPS,
        cpus_per_trial=1.0,
        gpus_per_trial=0.45 if gpu else 0.0,  # two trials share the GPU beside the actor
        soup_gpus=0.1 if gpu else 0.0,
        max_failures=0,
        reuse_workers=reuse_workers,
    ).validate()


def _plain(spec: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready values, as a Tune trial receives its spec (paths as strings)."""
    return json.loads(json.dumps(spec, default=str))


def prepare(root: Path, config: Any, lp_from: Path | None = None) -> list[Any]:
    """Record the config, put the base (cached) and LP (trained once) checkpoints in
    place, return the planned target runs."""
    from raysoup.io.checkpoint import is_checkpoint
    from raysoup.options import from_mapping
    from raysoup.sweep.plan import plan_sweep
    from raysoup.sweep.record import record_config
    from raysoup.training.trainer import RunSpec, ensure_base_checkpoint, train_run

    record_config(root, config)
    plan = plan_sweep(config, root)
    base = Path(plan["base"][0].spec["out"])
    if not is_checkpoint(base):
        shutil.copytree(ensure_base_checkpoint(), base, dirs_exist_ok=True)
    lp = plan["lp"][0]
    if not is_checkpoint(lp.spec["out"]):
        if lp_from is not None and is_checkpoint(lp_from):
            shutil.copytree(lp_from, lp.spec["out"])
        else:
            train_run(from_mapping(RunSpec, _plain(lp.spec), lp.key))
    return plan["target"]


def calibrate(runs: list[Any], scratch: Path, count: int) -> list[float]:
    """Seconds of ``count`` of the trials run standalone here (one torch thread, like a
    Ray worker with one CPU): the work of a trial without any orchestration. One more
    trial runs first, untimed: a reused worker has its caches warm too."""
    from raysoup.options import from_mapping
    from raysoup.training.trainer import RunSpec, train_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds = []
    try:
        for i, run in enumerate(runs[: count + 1]):
            spec = from_mapping(RunSpec, _plain({**run.spec, "out": scratch / run.key}), run.key)
            started = time.perf_counter()
            train_run(spec)
            if i > 0:
                seconds.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return seconds


def run_target(root: Path, config: Any, runs: list[Any], with_soup: bool) -> dict[str, Any]:
    """The timed target stage, exactly as ``run_sweep`` runs it (with or without soups)."""
    import ray

    from raysoup.sweep.runner import hand_over, run_runs, soup_feeder, start_soup

    started = time.perf_counter()
    if not with_soup:
        run_runs("target", runs, root, config)
        return {"wall_s": time.perf_counter() - started}
    soup = start_soup(root, config, runs)
    feeder = soup_feeder(root, config)  # as run_sweep makes it
    run_runs("target", runs, root, config, callbacks=[feeder])
    stage_done = time.perf_counter()
    hand_over(soup, runs)
    written = ray.get(soup.finalize.remote())
    ended = time.perf_counter()
    summary = ray.get(soup.summary.remote())
    soup_cpu_s = ray.get(soup.cpu_s.remote())
    ray.kill(soup, no_restart=True)
    return {
        "wall_s": ended - started,
        "soup_tail_s": ended - stage_done,
        "soup_cpu_s": soup_cpu_s,
        "soups_written": len(written),
        "greedy_size": len(summary[0]["greedy"]) if summary else 0,
        "greedy_evaluations": summary[0]["greedy_evaluations"] if summary else 0,
    }


def soup_work_s(runs: list[Any], scratch: Path, device: torch.device) -> float:
    """Seconds of the soups' own work measured alone: the soup actor's ``SoupMaker``, in
    this process with one torch thread, souping the finished trials post hoc (one batch,
    each rank decided once) and writing every soup, into ``scratch``."""
    from raysoup.soup.maker import SoupMaker
    from raysoup.soup.posthoc import finished_offers, planned_groups

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        maker = SoupMaker(
            scratch,
            "soup-work",
            expected=planned_groups(runs),
            device=device.type,
            persist=False,
            log=lambda line: None,
        )
        maker.offer(finished_offers(runs))
        maker.finalize_all()
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def trial_work(runs: list[Any]) -> float:
    """Seconds of work the trials measured themselves (``wall_s`` of their checkpoints)."""
    from raysoup.io.checkpoint import read_meta

    return sum(float(read_meta(run.spec["out"]).metrics["wall_s"]) for run in runs)


def overhead_row(
    mode: str, trials: int, slots: int, measured: dict[str, Any], standalone: float, work: float
) -> dict[str, Any]:
    """Wall time against the ideal ``total work / slots``."""
    ideal = standalone * trials / slots
    wall = measured["wall_s"]
    # the soups' own work, measured alone, shares the slots
    with_soup = ideal + measured.get("soup_work_s", 0.0) / slots
    return {
        "mode": mode,
        "trials": trials,
        "slots": slots,
        "trial_work_s": standalone,
        "ideal_s": ideal,
        **measured,
        "ideal_with_soup_s": with_soup,
        "overhead_x": wall / ideal,
        "overhead_with_soup_work_x": wall / with_soup,
        "overhead_per_trial_s": (wall - ideal) * slots / trials,
        "work_in_trials_s": work,
        "overhead_in_trials_x": wall / (work / slots),
    }


def fresh_import_s() -> float:
    """Seconds a fresh Python process takes to import the trainable (what every trial paid
    when Tune started one worker process per trial)."""
    code = "import raysoup.sweep.trainable"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--trials", type=int, default=20, help="target trials per sweep")
    parser.add_argument("--steps", type=int, default=2, help="training steps per trial")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--calibrate", type=int, default=5, help="standalone trials timed")
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the sweeps")
    add_common_arguments(parser, "orchestration")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.steps < 1 or args.cpus < 1 or args.calibrate < 1:
        parser.error("--trials, --steps, --cpus and --calibrate must be >= 1")
    device = device_from_args(parser, args.device)
    slots = min(args.cpus, args.trials)
    rows = []
    with tempfile.TemporaryDirectory(prefix="orch-") as tmp:
        workdir = args.workdir or Path(tmp)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        lp_from = None
        prepared = {}
        for mode in args.modes:
            config = sweep_config(
                f"orch-{mode}-{stamp}", args.trials, args.steps, device, mode != "fresh-workers"
            )
            root = workdir / config.name
            prepared[mode] = (root, config, prepare(root, config, lp_from))
            lp_from = Path(prepared[mode][2][0].spec["lp_head"])
        first_runs = next(iter(prepared.values()))[2]
        before = calibrate(first_runs, workdir / "calibration-before", args.calibrate)
        imports = fresh_import_s()
        import ray

        start_local_ray(Path(tmp) / "ray", args.cpus, 1 if device.type == "cuda" else 0)
        try:
            measured = {
                mode: run_target(root, config, runs, with_soup=mode == "with")
                for mode, (root, config, runs) in prepared.items()
            }
        finally:
            ray.shutdown()
        # Timed before and after the sweeps: a shared machine's speed drifts in between.
        after = calibrate(first_runs, workdir / "calibration-after", args.calibrate)
        if "with" in measured:
            runs = prepared["with"][2]
            measured["with"]["soup_work_s"] = soup_work_s(runs, workdir / "soup-work", device)
        standalone = median(before + after)
        print(
            f"one trial standalone: {standalone:.2f} s (median of {len(before + after)}; "
            f"{median(before):.2f} s before the sweeps, {median(after):.2f} s after); "
            f"importing the trainable in a fresh process: {imports:.1f} s"
        )
        for mode, (_, _, runs) in prepared.items():
            row = overhead_row(
                mode, args.trials, slots, measured[mode], standalone, trial_work(runs)
            )
            rows.append({**row, "work_before_s": median(before), "work_after_s": median(after)})
    info = machine(device)
    rows = [
        {"script": "orchestration", "steps": args.steps, **row, "fresh_import_s": imports, **info}
        for row in rows
    ]
    columns = [
        ("mode", ""),
        ("trials", "d"),
        ("slots", "d"),
        ("trial_work_s", ".2f"),
        ("ideal_s", ".1f"),
        ("wall_s", ".1f"),
        ("overhead_x", ".2f"),
        ("overhead_per_trial_s", ".2f"),
        ("overhead_in_trials_x", ".2f"),
        ("soup_cpu_s", ".1f"),
        ("soup_work_s", ".1f"),
        ("ideal_with_soup_s", ".1f"),
        ("overhead_with_soup_work_x", ".2f"),
        ("soup_tail_s", ".2f"),
        ("greedy_size", "d"),
        ("greedy_evaluations", "d"),
    ]
    print(format_table(rows, columns))
    print(f"rows: {write_rows(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
