"""Command-line pieces shared by the DomainBed experiment scripts in ``experiments/``.

The scripts are copied alone to the head node by ``ray submit``, so what they share lives
here, in the package: the run options common to a pool and a target sweep, the
``--hparams`` JSON parser, and the input checks made before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from raysoup.data.domainbed import DOMAINBED_DATASETS
from raysoup.io.storage import Location
from raysoup.models.networks import ARCHS, SMALL_ARCHS
from raysoup.options import OptionsError
from raysoup.sweep.config import SweepConfig
from raysoup.training.hparams import REGISTRIES
from raysoup.training.trainer import EVAL_SCHEDULES

DATASETS = {cls.NAME: cls for cls in DOMAINBED_DATASETS}


class DeprecatedFlag(argparse.Action):
    """An old spelling of a flag: still works, and says the new one on stderr."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"{parser.prog}: warning: {option_string} is deprecated, use {self.new}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_lp_stage_steps(parser: argparse.ArgumentParser) -> None:
    """``--lp-stage-steps`` (the config's ``lp_stage_steps``: steps of the LP stage), and
    its old spelling ``--lp-steps``, which read like the ``lp_steps`` hparam (a run's
    head-only phase)."""
    help_text = "steps of the linear-probe stage (default: DomainBed's)"
    parser.add_argument("--lp-stage-steps", type=int, default=None, help=help_text)
    parser.add_argument(
        "--lp-steps",
        dest="lp_stage_steps",
        type=int,
        action=DeprecatedFlag,
        new="--lp-stage-steps",
        help=argparse.SUPPRESS,
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Network, hparams, resources and cluster options (the same for every script)."""
    add = parser.add_argument
    add(
        "--checkpoint-freq",
        type=int,
        default=None,
        help="evaluate every N steps (default: the dataset's, as DiWA: 100, VLCS 50, "
        "DomainNet 500)",
    )
    add(
        "--eval-schedule",
        default="reference",
        choices=EVAL_SCHEDULES,
        help="reference: after update 1, 1+N, 1+2N, ... and the last (DomainBed); "
        "multiples: after updates N, 2N, ... and the last",
    )
    add(
        "--aux-lp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="an LP per auxiliary dataset whose head starts its auxiliary runs (reference); "
        "--no-aux-lp: aux runs train the head alone for lp_steps first",
    )
    add(
        "--arch",
        default=None,
        help=f"network (default: resnet50): {', '.join(a for a in ARCHS if a not in SMALL_ARCHS)}"
        f" or timm:<name> (then --pretrained-weights is required)",
    )
    add(
        "--pretrained-weights",
        type=Path,
        default=None,
        help="pretrained featurizer: a timm / torchvision / Hugging Face weights file or "
        "folder, or a raysoup checkpoint (ResNets' default: torchvision's cache, else a "
        "download)",
    )
    add("--image-size", type=int, default=None, help="input size (default: the model's)")
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


def run_option_values(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SweepConfig`` values of :func:`add_run_options` (``--address`` is not one)."""
    return {
        "checkpoint_freq": args.checkpoint_freq,
        "eval_schedule": args.eval_schedule,
        "aux_lp": args.aux_lp,
        "arch": args.arch,
        "image_size": args.image_size,
        "pretrained_weights": args.pretrained_weights,
        "hparams_registry": args.hparams_registry,
        "hparams": parse_hparams(args.hparams),
        "gpus_per_trial": args.gpus_per_trial,
        "cpus_per_trial": args.cpus_per_trial,
        "max_concurrent_trials": args.max_concurrent_trials,
    }


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


def check_inputs(config: SweepConfig, data_dir: Path, datasets: list[str]) -> None:
    """The weights file and each dataset's folder exist (``OptionsError`` naming them)."""
    if config.pretrained_weights is not None and not config.pretrained_weights.exists():
        raise OptionsError(
            f"--pretrained-weights {str(config.pretrained_weights)!r}: no such file or folder"
        )
    for name in datasets:
        folder = data_dir.expanduser() / DATASETS[name].FOLDER
        if not folder.is_dir():
            raise OptionsError(
                f"--data-dir {str(data_dir)!r}: {folder} does not exist (expected "
                f"<data-dir>/{DATASETS[name].FOLDER}/<env>/<class>/<image> for {name})"
            )


def run_sweep_for_script(
    parser: argparse.ArgumentParser, config: SweepConfig, storage: Location
) -> tuple[Location, int]:
    """``run_sweep_status`` for the experiment scripts: ``(root, exit code)``. An expected
    problem (a sweep held by another driver, a bad or unreachable storage) exits with
    its code from ``raysoup.errors``, without a traceback, before Ray does any work."""
    from raysoup.errors import RaysoupError
    from raysoup.sweep.runner import run_sweep_status

    try:
        return run_sweep_status(config, storage)  # code 3: some runs failed (stderr)
    except RaysoupError as error:
        print(f"{parser.prog}: {error.label}: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
