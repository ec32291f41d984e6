"""Method table: erm / uniform / greedy soups x pretrained / ratatouille / fusing, timed.

Runs a sweep config (default ``experiments/method_table.yaml``: the built-in benchmark,
3 trial seeds) through ``run_sweep``, exactly as ``raysoup run CONFIG`` does, then prints
the paper table (held-out test accuracy, mean ± SE over trial seeds, DomainBed's SE) with
the wall time the sweep took, and writes one Parquet row per (method, init, test env).
Running it again under the same name resumes (finished runs are skipped; the wall time
is then that of the resume, flagged ``resumed``). ``--results RUN`` only re-reads an
existing run's results (no sweep).

    python experiments/bench/method_table.py                      # ~15-20 min on 2 cores
    python experiments/bench/method_table.py --results runs/method_table
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import RESULTS_DIR, script_parser, write_rows

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "method_table.yaml"


def table_rows(soups: Any, dataset: str | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """The paper table of ``soups`` and one row per (method, init, env) with its seeds."""
    from raysoup.results import paper_table

    table = paper_table(soups, dataset=dataset)
    rows = []
    for method, init in table.index:
        cells = soups[(soups["method"] == method) & (soups["init"] == init)]
        for env in dict.fromkeys(table.columns.get_level_values(0)):
            if env == "Avg":
                n_seeds = cells.groupby("trial_seed")["test_env"].nunique().size
            else:
                n_seeds = int((cells["test_env"].astype(str) == env).sum())
            mean = float(table.loc[(method, init), (env, "mean")])
            se = float(table.loc[(method, init), (env, "se")])
            rows.append(
                {
                    "method": method,
                    "init": init,
                    "test_env": env,
                    "test_acc_mean": None if math.isnan(mean) else mean,
                    "test_acc_se": None if math.isnan(se) else se,
                    "n_seeds": n_seeds,
                    "mean_ingredients": float(cells["n_ingredients"].mean()),
                }
            )
    return table, rows


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("config", nargs="?", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--storage", type=Path, default=Path("runs"), help="sweep storage")
    parser.add_argument("--name", default=None, help="experiment name (default: the config's)")
    parser.add_argument("--results", type=Path, default=None, help="only read this run")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / "method_table.parquet",
        help="Parquet file the rows are written to, atomically (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    from raysoup.io import storage
    from raysoup.io.layout import SweepLayout
    from raysoup.options import OptionsError
    from raysoup.results import format_table, load_results
    from raysoup.sweep.config import load_config
    from raysoup.sweep.record import read_config
    from raysoup.sweep.script_options import run_sweep_for_script

    wall = math.nan
    resumed = False
    code = 0
    if args.results is not None:
        root = args.results
        try:
            config = read_config(root)
        except FileNotFoundError as error:
            parser.error(str(error))
    else:
        try:
            config = load_config(args.config, name=args.name)
        except OptionsError as error:
            parser.error(str(error))
        resumed = storage.exists(SweepLayout.of(args.storage, config.name).record)
        started = time.perf_counter()
        root, code = run_sweep_for_script(parser, config, args.storage)  # 3: runs failed
        wall = time.perf_counter() - started
    soups = load_results(root)["soups"]
    if soups.empty:
        parser.error(f"{root}: no soups rows yet (is the sweep finished?)")
    table, rows = table_rows(soups, config.dataset)
    n_trials = len(config.test_envs) * len(config.trial_seeds) * config.n_hparams
    rows = [
        {
            "script": "method_table",
            "sweep": config.name,
            "dataset": config.dataset,
            **row,
            "trials_per_init": n_trials,
            "wall_s": None if math.isnan(wall) else wall,
            "resumed": resumed,
            "root": str(root),
        }
        for row in rows
    ]
    print(
        f"{config.dataset}, test envs {config.test_envs}, trial seeds {config.trial_seeds}, "
        f"{config.n_hparams} hparams x {len(config.inits)} inits: test accuracy (%), "
        f"mean ± SE over trial seeds"
    )
    print(format_table(table), end="")
    if not math.isnan(wall):
        print(f"wall time: {wall / 60:.1f} min{' (resumed)' if resumed else ''}")
    print(f"rows: {write_rows(rows, args.out)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
