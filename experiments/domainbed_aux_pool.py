"""The auxiliary pool of model ratatouille over DomainBed datasets, on Ray Tune.

Per auxiliary dataset, as ModelRatatouille's sweep.py: a linear probe on all envs
(checkpoints/lp/lp-<dataset>-all/; --no-aux-lp skips it), then --n-hparams (4) fine-tunings
of the pretrained network (ImageNet ResNet-50 by default) on all envs, from that head, all
parameters trainable (no held-out env; the last step is kept), under
<storage>/<name>/checkpoints/aux/aux-<dataset>-h<seed>/. By default the pool covers all
five datasets: VLCS, PACS, OfficeHome, TerraIncognita, DomainNet.

Every target sweep then borrows it (the target's own dataset is never lent):
    python experiments/domainbed_sweep.py --dataset PACS --aux-pool <storage>/<name> ...
It is a sweep like any other (config ``dataset: null``): the same command again resumes
it, and a different config under the same name is refused.

Locally:
    python experiments/domainbed_aux_pool.py --data-dir /data/domainbed --storage /data/runs
On a cluster (this file alone is copied to the head node: it imports only raysoup):
    ray submit cluster.yaml experiments/domainbed_aux_pool.py -- --address auto \
        --data-dir /mnt/shared/domainbed --storage /mnt/shared/runs --gpus-per-trial 1
    ray job submit --address http://HEAD:8265 -- python experiments/domainbed_aux_pool.py ...

Every value is checked before Ray starts: a bad one exits with code 2 and a message
naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysoup.options import OptionsError, from_mapping
from raysoup.results import load_results
from raysoup.sweep.cluster import connect
from raysoup.sweep.config import SweepConfig
from raysoup.sweep.script_options import (
    DATASETS,
    add_lp_stage_steps,
    add_run_options,
    check_inputs,
    run_option_values,
    run_sweep_for_script,
)

SUMMARY = ["trial_id", "dataset", "hparams_seed", "steps", "id_val_acc", "checkpoint"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--datasets",
        nargs="+",
        default=list(DATASETS),
        choices=list(DATASETS),
        help="auxiliary datasets (default: all five)",
    )
    add("--data-dir", required=True, type=Path, help="DomainBed data root (every node sees it)")
    add("--n-hparams", type=int, default=4, help="auxiliary runs per dataset (hparams seeds)")
    add("--steps", type=int, default=None, help="steps per run (default: DomainBed's)")
    add_lp_stage_steps(parser)
    add("--storage", default="runs", help="shared path every node sees")
    add("--name", default="domainbed-aux-pool", help="experiment name")
    add_run_options(parser)
    return parser


def build_config(args: argparse.Namespace) -> SweepConfig:
    """The validated pool config; ``OptionsError`` naming the first bad value."""
    values = {
        "name": args.name,
        "dataset": None,  # no target: the auxiliary pool alone
        "data_dir": args.data_dir,
        "aux_datasets": args.datasets,
        "aux_n_hparams": args.n_hparams,
        "aux_steps": args.steps,
        "lp_stage_steps": args.lp_stage_steps,
        **run_option_values(args),
    }
    config = from_mapping(SweepConfig, values, "domainbed_aux_pool.py").validate()
    check_inputs(config, args.data_dir, config.aux_datasets)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
    except OptionsError as error:
        parser.error(str(error))  # exit code 2, before Ray starts
    connect(args.address)
    root, code = run_sweep_for_script(parser, config, args.storage)  # 3: runs failed
    trials = load_results(root)["trials"]
    aux = trials[trials.stage == "aux"].sort_values("trial_id")
    print(aux[SUMMARY].to_string(index=False))
    print(f"pool: {root}  (give target sweeps --aux-pool {root})")
    return code


if __name__ == "__main__":
    sys.exit(main())
