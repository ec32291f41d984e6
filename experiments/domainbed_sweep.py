"""Ratatouille / model soups target sweep on one DomainBed dataset, on Ray Tune.

Stages under <storage>/<name>/ (each a Tune experiment; the same command again resumes):
one linear probe per (test env, trial seed); the auxiliary pool (one fine-tuning on all
envs of each auxiliary dataset), unless --aux-pool lends one; then the target sweep,
n_hparams x trial seeds x test envs x inits (pretrained, ratatouille, fusing).

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
import json
import sys
from pathlib import Path
from typing import Any

from raysoup.data.domainbed import DOMAINBED_DATASETS
from raysoup.models.networks import ARCHS
from raysoup.options import OptionsError, from_mapping
from raysoup.results import load_results, sweep_table
from raysoup.sweep.cluster import connect
from raysoup.sweep.config import SweepConfig
from raysoup.sweep.plan import plan_sweep
from raysoup.sweep.runner import experiment_root, run_sweep
from raysoup.training.hparams import REGISTRIES
from raysoup.training.inits import INIT_STRATEGIES

DATASETS = {cls.NAME: cls for cls in DOMAINBED_DATASETS}


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
        default=list(INIT_STRATEGIES),
        choices=INIT_STRATEGIES,
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
    add("--aux-n-hparams", type=int, default=1, help="auxiliary runs per auxiliary dataset")
    add(
        "--aux-pool",
        type=Path,
        default=None,
        help="<storage>/<name> of a finished domainbed_aux_pool.py run to borrow from",
    )
    add("--storage", default="runs", help="shared path every node sees")
    add("--name", default=None, help="experiment name (default: domainbed-<dataset>)")
    add("--steps", type=int, default=None, help="target steps (default: DomainBed's)")
    add("--aux-steps", type=int, default=None, help="auxiliary steps (default: DomainBed's)")
    add("--lp-steps", type=int, default=None, help="linear-probe steps (default: DomainBed's)")
    add("--checkpoint-freq", type=int, default=None, help="evaluate every N steps")
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


def check_data_dir(data_dir: Path, datasets: list[str]) -> None:
    for name in datasets:
        folder = data_dir.expanduser() / DATASETS[name].FOLDER
        if not folder.is_dir():
            raise OptionsError(
                f"--data-dir {str(data_dir)!r}: {folder} does not exist (expected "
                f"<data-dir>/{DATASETS[name].FOLDER}/<env>/<class>/<image> for {name})"
            )


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
        "lp_stage_steps": args.lp_steps,
        "checkpoint_freq": args.checkpoint_freq,
        "arch": args.arch,
        "pretrained_weights": args.pretrained_weights,
        "hparams_registry": args.hparams_registry,
        "hparams": parse_hparams(args.hparams),
        "fusing_range": args.fusing_range,
        "gpus_per_trial": args.gpus_per_trial,
        "cpus_per_trial": args.cpus_per_trial,
        "max_concurrent_trials": args.max_concurrent_trials,
    }
    config = from_mapping(SweepConfig, values, "domainbed_sweep.py").validate()
    if config.pretrained_weights is not None and not config.pretrained_weights.is_file():
        raise OptionsError(f"--pretrained-weights {str(config.pretrained_weights)!r}: no file")
    check_data_dir(args.data_dir, [args.dataset, *config.aux_datasets])
    return config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
        plan_sweep(config, experiment_root(args.storage, config.name))  # checks --aux-pool
    except OptionsError as error:
        parser.error(str(error))  # exit code 2, before Ray starts
    connect(args.address)
    root = run_sweep(config, args.storage)
    print(sweep_table(load_results(root), dataset=config.dataset))
    print(f"results: {root / 'results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
