"""Ratatouille / model soups target sweep on one DomainBed dataset, on Ray Tune.

Stages under <storage>/<name>/ (each a Tune experiment; the same command again resumes):
one linear probe per test env, on trial seed 0, shared by every trial seed
(--lp-per-trial-seed: one per (test env, trial seed)), and one per auxiliary dataset; the
auxiliary pool (--aux-n-hparams fine-tunings on all envs of each auxiliary dataset), unless
--aux-pool lends one; then the target sweep, n_hparams x trial seeds x test envs x inits
(pretrained, ratatouille, fusing), each run keeping its best ID-val evaluation
(--target-keep last: its last).

Locally:
    python experiments/domainbed_sweep.py --dataset PACS --data-dir /data/domainbed \
        --storage /data/runs
On a cluster (this file alone is copied to the head node: it imports only raysoup):
    ray submit cluster.yaml experiments/domainbed_sweep.py -- --address auto \
        --dataset PACS --data-dir /mnt/shared/domainbed --storage /mnt/shared/runs \
        --gpus-per-trial 1
    ray job submit --address http://HEAD:8265 -- python experiments/domainbed_sweep.py \
        --dataset PACS ... (the job's RAY_ADDRESS attaches it to that cluster)

Sharing one auxiliary pool between targets: train the pool once over all five datasets
(experiments/domainbed_aux_pool.py --name pool), then give every target sweep
--aux-pool <storage>/pool. Its runs are looked up by the same keys the sweep's own aux
stage would use (aux-<dataset>-h<seed>), only the --aux-datasets are lent (never the
target's own runs), and the pool must have the same --arch and --pretrained-weights.
Without --aux-pool the sweep trains its own pool under <storage>/<name>/checkpoints/aux/.

Every value is checked before Ray starts: a bad one exits with code 2 and a message
naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysoup.contract import INITS
from raysoup.io.layout import SweepLayout
from raysoup.options import OptionsError, from_mapping
from raysoup.results import load_results, sweep_table
from raysoup.sweep.cluster import connect
from raysoup.sweep.config import SweepConfig
from raysoup.sweep.plan import plan_sweep
from raysoup.sweep.script_options import (
    DATASETS,
    add_lp_stage_steps,
    add_run_options,
    check_inputs,
    run_option_values,
    run_sweep_for_script,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Docs: the module docstring of experiments/domainbed_sweep.py and the README.",
    )
    add = parser.add_argument
    add("--dataset", required=True, choices=sorted(DATASETS), help="target dataset")
    add(
        "--test-env",
        nargs="+",
        default=None,
        metavar="ENV",
        help="held-out env(s): index or name (e.g. 0 or A); default: every env in turn",
    )
    add("--data-dir", required=True, type=Path, help="DomainBed data root (every node sees it)")
    add(
        "--init",
        nargs="+",
        default=list(INITS),
        choices=INITS,
        help="init strategies to sweep (default: all three)",
    )
    add("--fusing-range", type=float, default=4.0, help="R in lambda = softmax(R*u)")
    add("--n-hparams", type=int, default=20, help="hparams seeds per (test env, seed, init)")
    add("--trial-seeds", nargs="+", type=int, default=[0, 1, 2], help="split / LP seeds")
    add(
        "--aux-datasets",
        nargs="+",
        default=None,
        choices=sorted(DATASETS),
        help="auxiliary datasets (default: the four DomainBed datasets other than --dataset)",
    )
    add("--aux-n-hparams", type=int, default=4, help="auxiliary runs per auxiliary dataset")
    add(
        "--target-keep",
        default="best",
        choices=["best", "last"],
        help="the evaluation a target run keeps: best ID-val (reference) or last",
    )
    add(
        "--lp-per-trial-seed",
        action="store_true",
        help="one LP per (test env, trial seed) instead of one shared per test env",
    )
    add(
        "--aux-pool",
        default=None,  # a string: a URI (s3://...) must not become a Path
        help="<storage>/<name> (a path or a URI) of a finished domainbed_aux_pool.py run "
        "to borrow from",
    )
    add("--storage", default="runs", help="shared path every node sees")
    add("--name", default=None, help="experiment name (default: domainbed-<dataset>)")
    add("--steps", type=int, default=None, help="target steps (default: DomainBed's)")
    add("--aux-steps", type=int, default=None, help="auxiliary steps (default: DomainBed's)")
    add_lp_stage_steps(parser)
    add_run_options(parser)
    return parser


def parse_test_envs(dataset: str, values: list[str] | None) -> list[int]:
    """Env indices from indices or names; every env when ``values`` is None."""
    envs = DATASETS[dataset].ENVIRONMENTS
    if values is None:
        return list(range(len(envs)))
    indices = []
    for value in values:
        if value.lstrip("-").isdigit():
            indices.append(int(value))  # range checked by SweepConfig.validate
        elif value in envs:
            indices.append(envs.index(value))
        else:
            raise OptionsError(
                f"--test-env {value!r}: {dataset} envs are {envs} (or 0..{len(envs) - 1})"
            )
    return indices


def build_config(args: argparse.Namespace) -> SweepConfig:
    """The validated sweep config; ``OptionsError`` naming the first bad value."""
    aux = args.aux_datasets
    if aux is None:
        aux = [name for name in DATASETS if name != args.dataset]
    values = {
        "name": args.name or f"domainbed-{args.dataset}",
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "test_envs": parse_test_envs(args.dataset, args.test_env),
        "trial_seeds": args.trial_seeds,
        "n_hparams": args.n_hparams,
        "inits": args.init,
        "aux_datasets": aux if set(args.init) - {"pretrained"} else [],
        "aux_n_hparams": args.aux_n_hparams,
        "aux_pool": args.aux_pool,
        "steps": args.steps,
        "aux_steps": args.aux_steps,
        "lp_stage_steps": args.lp_stage_steps,
        "fusing_range": args.fusing_range,
        "target_keep": args.target_keep,
        "lp_per_trial_seed": args.lp_per_trial_seed,
        **run_option_values(args),
    }
    config = from_mapping(SweepConfig, values, "domainbed_sweep.py").validate()
    check_inputs(config, args.data_dir, [args.dataset, *config.aux_datasets])
    return config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
        plan_sweep(config, SweepLayout.of(args.storage, config.name).root)  # checks --aux-pool
    except OptionsError as error:
        parser.error(str(error))  # exit code 2, before Ray starts
    connect(args.address)
    root, code = run_sweep_for_script(parser, config, args.storage)  # 3: runs failed
    print(sweep_table(load_results(root), dataset=config.dataset))
    print(f"results: {SweepLayout(root).results}")  # root is a URI string on s3://
    return code


if __name__ == "__main__":
    sys.exit(main())
