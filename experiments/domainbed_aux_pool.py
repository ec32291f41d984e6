"""The auxiliary pool of model ratatouille over DomainBed datasets, on Ray Tune.

Fine-tunes the pretrained network (ImageNet ResNet-50 by default) on all envs of each
auxiliary dataset (no held-out env; the last step is kept), --n-hparams runs per dataset,
under <storage>/<name>/checkpoints/aux/aux-<dataset>-h<seed>/. By default the pool
covers all five datasets: VLCS, PACS, OfficeHome, TerraIncognita, DomainNet.

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
import json
import sys
from pathlib import Path
from typing import Any

from raysoup.data.domainbed import DOMAINBED_DATASETS
from raysoup.models.networks import ARCHS
from raysoup.options import OptionsError, from_mapping
from raysoup.results import load_results
from raysoup.sweep.cluster import connect
from raysoup.sweep.config import SweepConfig
from raysoup.sweep.runner import run_sweep
from raysoup.training.hparams import REGISTRIES

DATASETS = {cls.NAME: cls for cls in DOMAINBED_DATASETS}
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
    add("--n-hparams", type=int, default=1, help="auxiliary runs per dataset (hparams seeds)")
    add("--steps", type=int, default=None, help="steps per run (default: DomainBed's)")
    add("--checkpoint-freq", type=int, default=None, help="evaluate every N steps")
    add("--storage", default="runs", help="shared path every node sees")
    add("--name", default="domainbed-aux-pool", help="experiment name")
    add(
        "--arch",
        default=None,
        choices=[a for a in ARCHS if a != "cnn"],
        help="network (default: resnet50)",
    )
    add(
        "--pretrained-weights",
        type=Path,
        default=None,
        help="ImageNet weights file (default: torchvision's cache, else a download)",
    )
    add("--hparams-registry", default="diwa", choices=REGISTRIES, help="hparam distributions")
    add(
        "--hparams",
        default=None,
        metavar="JSON",
        help="overrides for every run, e.g. '{\"batch_size\": 16}'",
    )
    add("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial (1 on a GPU cluster)")
    add("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial")
    add("--max-concurrent-trials", type=int, default=0, help="0: as many as resources allow")
    add(
        "--address",
        default=None,
        help="'auto' to attach to the running cluster (ray submit); default: $RAY_ADDRESS "
        "(set by ray job submit), else a new local Ray instance",
    )
    return parser


def parse_hparams(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise OptionsError(f"--hparams {text!r}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise OptionsError(f"--hparams {text!r}: expected a JSON object")
    return value


def build_config(args: argparse.Namespace) -> SweepConfig:
    """The validated pool config; ``OptionsError`` naming the first bad value."""
    values = {
        "name": args.name,
        "dataset": None,  # no target: the auxiliary pool alone
        "data_dir": args.data_dir,
        "aux_datasets": args.datasets,
        "aux_n_hparams": args.n_hparams,
        "aux_steps": args.steps,
        "checkpoint_freq": args.checkpoint_freq,
        "arch": args.arch,
        "pretrained_weights": args.pretrained_weights,
        "hparams_registry": args.hparams_registry,
        "hparams": parse_hparams(args.hparams),
        "gpus_per_trial": args.gpus_per_trial,
        "cpus_per_trial": args.cpus_per_trial,
        "max_concurrent_trials": args.max_concurrent_trials,
    }
    config = from_mapping(SweepConfig, values, "domainbed_aux_pool.py").validate()
    if config.pretrained_weights is not None and not config.pretrained_weights.is_file():
        raise OptionsError(f"--pretrained-weights {str(config.pretrained_weights)!r}: no file")
    for name in config.aux_datasets:
        folder = args.data_dir.expanduser() / DATASETS[name].FOLDER
        if not folder.is_dir():
            raise OptionsError(
                f"--data-dir {str(args.data_dir)!r}: {folder} does not exist (expected "
                f"<data-dir>/{DATASETS[name].FOLDER}/<env>/<class>/<image> for {name})"
            )
    return config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
    except OptionsError as error:
        parser.error(str(error))  # exit code 2, before Ray starts
    connect(args.address)
    root = run_sweep(config, args.storage)
    trials = load_results(root)["trials"]
    aux = trials[trials.stage == "aux"].sort_values("trial_id")
    print(aux[SUMMARY].to_string(index=False))
    print(f"pool: {root}  (give target sweeps --aux-pool {root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
