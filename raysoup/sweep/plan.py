"""Which runs a sweep is made of: pure planning, no Ray, no files.

Stages run in order; each run has a stable key (its trial id in results and its
checkpoint folder name), so a resumed sweep recognises what it already has. The root is
a local path or a URI (``s3://bucket/runs/<name>``); paths in the plan are then ``Path``
objects or URI strings (``raysoup.io.storage.join``), with the same layout.

    base    (built-in only)  -> checkpoints/base/base
    lp      per (test env, trial seed)            -> checkpoints/lp/<key>
    aux     per (aux dataset, aux hparams seed)   -> checkpoints/aux/<key>
    target  per (test env, trial seed, hparams seed, init) -> checkpoints/target/<key>
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysoup.data.builtin import BUILTIN_BASE
from raysoup.data.registry import dataset_class
from raysoup.io import storage
from raysoup.io.storage import Location
from raysoup.sweep.config import SweepConfig

STAGE_ORDER = ("base", "lp", "aux", "target")
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class PlannedRun:
    stage: str
    key: str
    spec: dict[str, Any]  # RunSpec fields; paths (or URIs) under the experiment root


def checkpoint_path(root: Location, stage: str, key: str) -> Location:
    return storage.join(root, CHECKPOINTS, stage, key)


def _common(config: SweepConfig) -> dict[str, Any]:
    return {
        "data_dir": config.data_dir,
        "arch": config.arch,
        "pretrained_weights": config.pretrained_weights,
        "hparams_registry": config.hparams_registry,
        "hparams_depend_on_trial_seed": config.hparams_depend_on_trial_seed,
        "holdout_fraction": config.holdout_fraction,
        "checkpoint_freq": config.checkpoint_freq,
    }


def plan_sweep(config: SweepConfig, root: Location) -> dict[str, list[PlannedRun]]:
    """Every run of every stage, in a deterministic order."""
    root = root if storage.is_uri(root) else Path(root)
    builtin = dataset_class(config.dataset).IS_BUILTIN
    common = _common(config)
    stages: dict[str, list[PlannedRun]] = {stage: [] for stage in STAGE_ORDER}
    pretrained = None
    if builtin:
        pretrained = checkpoint_path(root, "base", "base")
        stages["base"].append(
            PlannedRun(
                "base",
                "base",
                {"dataset": BUILTIN_BASE, "stage": "base", "test_env": -1, "out": pretrained},
            )
        )
    common["pretrained"] = pretrained
    for test_env in config.test_envs:
        for trial_seed in config.trial_seeds:
            key = f"lp-{config.dataset}-e{test_env}-s{trial_seed}"
            spec = {
                **common,
                "dataset": config.dataset,
                "stage": "lp",
                "test_env": test_env,
                "trial_seed": trial_seed,
                "steps": config.lp_stage_steps,
                "out": checkpoint_path(root, "lp", key),
            }
            stages["lp"].append(PlannedRun("lp", key, spec))
    needs_pool = any(init != "pretrained" for init in config.inits)
    for aux in config.aux_datasets if needs_pool else []:
        for hparams_seed in range(config.aux_n_hparams):
            key = f"aux-{aux}-h{hparams_seed}"
            spec = {
                **common,
                "dataset": aux,
                "stage": "aux",
                "test_env": -1,
                "hparams_seed": hparams_seed,
                "steps": config.aux_steps,
                "out": checkpoint_path(root, "aux", key),
            }
            stages["aux"].append(PlannedRun("aux", key, spec))
    for test_env in config.test_envs:
        for trial_seed in config.trial_seeds:
            lp_key = f"lp-{config.dataset}-e{test_env}-s{trial_seed}"
            for hparams_seed in range(config.n_hparams):
                for init in config.inits:
                    key = (
                        f"target-{config.dataset}-e{test_env}-s{trial_seed}-h{hparams_seed}-{init}"
                    )
                    spec = {
                        **common,
                        "dataset": config.dataset,
                        "stage": "target",
                        "test_env": test_env,
                        "trial_seed": trial_seed,
                        "hparams_seed": hparams_seed,
                        "init": init,
                        "steps": config.steps,
                        "lp_head": checkpoint_path(root, "lp", lp_key),
                        "aux_dir": [storage.join(root, CHECKPOINTS, "aux")]
                        if init != "pretrained"
                        else [],
                        "fusing_range": config.fusing_range,
                        "ratatouille_choice": config.ratatouille_choice,
                        "aux_buffers": config.aux_buffers,
                        "out": checkpoint_path(root, "target", key),
                    }
                    stages["target"].append(PlannedRun("target", key, spec))
    return {stage: runs for stage, runs in stages.items() if runs}
