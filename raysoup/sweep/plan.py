"""Which runs a sweep is made of: planning, no Ray (and no files but an aux pool's).

Stages run in order; each run has a stable key (its trial id in results and its
checkpoint folder name), so a resumed sweep recognises what it already has. The root is
a local path or a URI (``s3://bucket/runs/<name>``); paths in the plan are then ``Path``
objects or URI strings (``raysoup.io.storage.join``), with the same layout.

    base    (built-in `cnn` only) -> checkpoints/base/base
    lp      per test env, on trial seed 0, shared by every trial seed (with
            lp_per_trial_seed: per (test env, trial seed)) -> checkpoints/lp/lp-<d>-e<env>-s<seed>
            per aux dataset, all envs, trial seed 0 (aux_lp) -> checkpoints/lp/lp-<aux>-all
    aux     per (aux dataset, aux hparams seed)   -> checkpoints/aux/<key>
    target  per (test env, trial seed, hparams seed, init) -> checkpoints/target/<key>

As in ModelRatatouille's sweep.py, an LP trains with the default hyperparameters and
keeps its best ID-val evaluation; the shared target LP uses trial seed 0's splits, and
every auxiliary run starts from its dataset's LP head.

``dataset: null`` plans an auxiliary pool alone (base if built-in, then aux). With
``aux_pool``, the aux stage (and, built-in, the base) is not planned: target runs read
``<aux_pool>/checkpoints/aux/<key>`` (same keys), one folder per configured auxiliary
run, so a pool holding more datasets than configured (e.g. the target's own) lends only
the configured ones. The pool is a local path or a URI, like the root, read through
``raysoup.io.storage`` either way. That is the one case where planning reads files: the
pool's ``sweep.json``, whether its checkpoints exist, and, since a pool may come from
anyone, their symlinks, metadata and safetensors headers (``raysoup.io.pool``, O(header)
each).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysoup.contract import STAGES
from raysoup.data.builtin import BUILTIN_BASE
from raysoup.data.registry import dataset_class
from raysoup.io import storage
from raysoup.io.checkpoint import META_FILE
from raysoup.io.layout import RECORD, SweepLayout
from raysoup.io.pool import check_meta_paths, check_pool_symlinks
from raysoup.io.storage import Location
from raysoup.options import OptionsError
from raysoup.sweep.config import (
    AUX_POOL_EXPECTED,
    SweepConfig,
    check_aux_pool_location,
    parse_record,
)
from raysoup.training.inits import discover_aux_pool
from raysoup.training.trainer import SHARED_LP_SEED

# Settings an auxiliary pool must share with a target sweep that borrows it: the same
# network, fine-tuned from the same pretrained weights.
POOL_MUST_MATCH = ("arch", "pretrained_weights")


@dataclass(frozen=True)
class PlannedRun:
    stage: str
    key: str
    spec: dict[str, Any]  # RunSpec fields; paths (or URIs) under the experiment root


def checkpoint_path(root: Location, stage: str, key: str) -> Location:
    return SweepLayout(root).checkpoint(stage, key)


def aux_key(dataset: str, hparams_seed: int) -> str:
    return f"aux-{dataset}-h{hparams_seed}"


def lp_key(dataset: str, test_env: int, trial_seed: int = 0) -> str:
    """The LP of a target (dataset, test env, trial seed), or of an auxiliary dataset
    (``test_env == -1``: all envs, ``lp-<dataset>-all``)."""
    if test_env == -1:
        return f"lp-{dataset}-all"
    return f"lp-{dataset}-e{test_env}-s{trial_seed}"


def lp_seed(config: SweepConfig, trial_seed: int) -> int:
    """The trial seed of the LP whose head target runs of ``trial_seed`` start from."""
    return trial_seed if config.lp_per_trial_seed else SHARED_LP_SEED


def pool_root(config: SweepConfig) -> Location:
    """The borrowed pool's folder: a local path resolved (``~`` expanded), or a URI."""
    assert config.aux_pool is not None
    return storage.resolve(config.aux_pool)


def check_aux_pool(config: SweepConfig) -> list[Location]:
    """The pool checkpoints a target sweep with ``aux_pool`` borrows, checked to exist and
    to come from a compatible sweep; ``OptionsError`` naming what is wrong otherwise.
    The pool is untrusted: a symlink leading out of it, or a checkpoint with malformed
    metadata or weights header, or naming paths outside it, is a ``CheckpointError``.
    A local pool and a URI one are read alike (only metadata and weights headers)."""
    assert config.aux_pool is not None
    check_aux_pool_location(config.aux_pool)
    value = str(config.aux_pool)
    layout = SweepLayout(pool_root(config))
    if not storage.is_file(layout.record):
        raise OptionsError(f"aux_pool={value!r}: no {RECORD}; not a sweep ({AUX_POOL_EXPECTED})")
    theirs = parse_record(storage.read_bytes(layout.record), str(layout.record))["config"]
    ours = config.to_dict()
    for name in POOL_MUST_MATCH:
        if theirs.get(name) != ours[name]:
            raise OptionsError(
                f"aux_pool={value!r} was trained with {name}="
                f"{theirs.get(name)!r}, this sweep has {name}={ours[name]!r}"
            )
    check_pool_symlinks(layout.checkpoints())
    keys = [aux_key(aux, h) for aux in config.aux_datasets for h in range(config.aux_n_hparams)]
    paths = [layout.checkpoint("aux", key) for key in keys]
    missing = [
        key for key, path in zip(keys, paths, strict=True) if not storage.is_checkpoint(path)
    ]
    if missing:
        raise OptionsError(
            f"aux_pool={value!r} lacks auxiliary run(s) {missing}: train or "
            f"finish the pool first (it has aux_datasets={theirs.get('aux_datasets')}, "
            f"aux_n_hparams={theirs.get('aux_n_hparams')})"
        )
    for path in paths:  # refused here, before a single trial starts
        meta = storage.read_meta(path)
        check_meta_paths(meta, layout.root, storage.join(path, META_FILE))
        storage.check_weights(path, meta)
    return paths


def _common(config: SweepConfig) -> dict[str, Any]:
    # Options added later join a spec only when set: the plans of earlier sweeps (and so
    # their trials' identities) stay what they were.
    added = {"image_size": config.image_size} if config.image_size is not None else {}
    return {
        **added,
        "hparams": dict(config.hparams),
        "data_dir": config.data_dir,
        "arch": config.arch,
        "pretrained_weights": config.pretrained_weights,
        "hparams_registry": config.hparams_registry,
        "hparams_depend_on_trial_seed": config.hparams_depend_on_trial_seed,
        "holdout_fraction": config.holdout_fraction,
        "checkpoint_freq": config.checkpoint_freq,
        "eval_schedule": config.eval_schedule,
    }


# (dataset, test env, trial seed) of an LP: its identity in a plan (see ``lp_key``).
LpId = tuple[str, int, int]


def _lp_run(config: SweepConfig, common: dict[str, Any], root: Location, lp: LpId) -> PlannedRun:
    dataset, test_env, trial_seed = lp
    key = lp_key(dataset, test_env, trial_seed)
    spec = {
        **common,
        "dataset": dataset,
        "stage": "lp",
        "test_env": test_env,
        "trial_seed": trial_seed,
        "steps": config.lp_stage_steps,
        "out": checkpoint_path(root, "lp", key),
    }
    return PlannedRun("lp", key, spec)


def _uses_builtin_base(config: SweepConfig) -> bool:
    """Whether the sweep's networks start from the built-in base: only the `cnn` network
    trains a base stage; `glyphcnn` starts from the foundation shipped in the package,
    ResNets from ImageNet."""
    datasets = config.aux_datasets if config.dataset is None else [config.dataset]
    return any((config.arch or dataset_class(name).DEFAULT_ARCH) == "cnn" for name in datasets)


def _base_stage(
    config: SweepConfig, root: Location, borrowing: bool
) -> tuple[Location | None, list[PlannedRun]]:
    """The checkpoint every run's 'pretrained' featurizer comes from (``None``: not a
    checkpoint of the sweep's), and the base run to plan for it. A borrowing sweep takes
    the pool's own base, the one its auxiliary runs started from."""
    if not _uses_builtin_base(config):
        return None, []
    if borrowing:
        pretrained = SweepLayout(pool_root(config)).checkpoint("base", "base")
        if not storage.is_checkpoint(pretrained):
            raise OptionsError(
                f"aux_pool={str(config.aux_pool)!r} has no base network: expected the "
                f"checkpoint its auxiliary runs started from at {pretrained}"
            )
        return pretrained, []
    pretrained = checkpoint_path(root, "base", "base")
    spec = {"dataset": BUILTIN_BASE, "stage": "base", "test_env": -1, "out": pretrained}
    return pretrained, [PlannedRun("base", "base", spec)]


def _lp_stage(
    config: SweepConfig, common: dict[str, Any], root: Location, aux_datasets: list[str]
) -> dict[LpId, PlannedRun]:
    """The LP runs by what they are for: one per target test env (on the shared trial
    seed, or per trial seed), then, with ``aux_lp``, one per auxiliary dataset (all envs)."""
    targets: list[LpId] = [
        (config.dataset, test_env, trial_seed)
        for test_env in ([] if config.dataset is None else config.test_envs)
        for trial_seed in dict.fromkeys(lp_seed(config, s) for s in config.trial_seeds)
    ]
    auxes: list[LpId] = [(aux, -1, SHARED_LP_SEED) for aux in aux_datasets if config.aux_lp]
    return {lp: _lp_run(config, common, root, lp) for lp in [*targets, *auxes]}


def _aux_stage(
    config: SweepConfig,
    common: dict[str, Any],
    root: Location,
    aux_datasets: list[str],
    lps: dict[LpId, PlannedRun],
) -> list[PlannedRun]:
    """Per auxiliary dataset, ``aux_n_hparams`` runs on all its envs, from its LP's head
    when there is one."""
    runs = []
    for aux in aux_datasets:
        lp = lps.get((aux, -1, SHARED_LP_SEED))
        for hparams_seed in range(config.aux_n_hparams):
            key = aux_key(aux, hparams_seed)
            spec = {
                **common,
                "dataset": aux,
                "stage": "aux",
                "test_env": -1,
                "hparams_seed": hparams_seed,
                "steps": config.aux_steps,
                "lp_head": lp.spec["out"] if lp is not None else None,
                "out": checkpoint_path(root, "aux", key),
            }
            runs.append(PlannedRun("aux", key, spec))
    return runs


def _target_stage(
    config: SweepConfig,
    common: dict[str, Any],
    root: Location,
    lps: dict[LpId, PlannedRun],
    aux_dir: list[Location],
) -> list[PlannedRun]:
    """Per (test env, trial seed, hparams seed, init), one target run from its LP's head;
    an auxiliary init reads the pool ``aux_dir``."""
    if config.dataset is None:
        return []
    runs = []
    for test_env in config.test_envs:
        for trial_seed in config.trial_seeds:
            head = lps[(config.dataset, test_env, lp_seed(config, trial_seed))].spec["out"]
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
                        "lp_head": head,
                        "lp_per_trial_seed": config.lp_per_trial_seed,
                        "keep": config.target_keep,
                        "aux_dir": aux_dir if init != "pretrained" else [],
                        "fusing_range": config.fusing_range,
                        "ratatouille_choice": config.ratatouille_choice,
                        "aux_buffers": config.aux_buffers,
                        **({"allow_undeclared_aux": True} if config.allow_undeclared_aux else {}),
                        "out": checkpoint_path(root, "target", key),
                    }
                    runs.append(PlannedRun("target", key, spec))
    return runs


def check_aux_dirs(config: SweepConfig) -> None:
    """Refuse, before a single trial starts, foreign pools (``aux_dirs``) that hold
    undeclared data (unless allowed), escaping links, or another network than the sweep's."""
    assert config.dataset is not None
    pool = discover_aux_pool(config.aux_dirs, config.dataset, config.allow_undeclared_aux)
    arch = config.arch or dataset_class(config.dataset).DEFAULT_ARCH
    for path in (p for runs in pool.runs.values() for p in runs):
        theirs = storage.read_meta(path).arch
        if theirs != arch:
            raise OptionsError(
                f"aux_dirs: {path} holds a {theirs} featurizer, this sweep trains {arch}: "
                f"auxiliary featurizers must fit the target network"
            )
    if not pool.runs:
        raise OptionsError(
            f"aux_dirs {config.aux_dirs}: no usable auxiliary checkpoint (the leakage guard "
            f"excluded {len(pool.excluded)} trained on {config.dataset!r})"
        )


def plan_sweep(config: SweepConfig, root: Location) -> dict[str, list[PlannedRun]]:
    """Every run of every stage, in a deterministic order (stages without runs left out)."""
    root = root if storage.is_uri(root) else Path(root)
    needs_pool = config.dataset is None or any(init != "pretrained" for init in config.inits)
    borrowed = check_aux_pool(config) if config.aux_pool is not None and needs_pool else None
    pretrained, base = _base_stage(config, root, borrowing=borrowed is not None)
    common = {**_common(config), "pretrained": pretrained}
    aux_datasets = config.aux_datasets if needs_pool and borrowed is None else []
    lps = _lp_stage(config, common, root, aux_datasets)
    if config.aux_dirs and config.dataset is not None and needs_pool:
        check_aux_dirs(config)
    own = borrowed if borrowed is not None else [SweepLayout(root).checkpoints("aux")]
    aux_dir = (own if aux_datasets or borrowed else []) + list(config.aux_dirs)
    stages = {
        "base": base,
        "lp": list(lps.values()),
        "aux": _aux_stage(config, common, root, aux_datasets, lps),
        "target": _target_stage(config, common, root, lps, aux_dir),
    }
    return {stage: stages[stage] for stage in STAGES if stages[stage]}


def dependencies(run: PlannedRun, plan: dict[str, list[PlannedRun]]) -> list[str]:
    """The keys of the planned runs whose checkpoints ``run`` starts from.

    Its ``pretrained`` network (the base) and its ``lp_head``; and, for a target run with
    an auxiliary init, every run of this sweep's aux stage: the init is picked by index
    from the whole pool (``hparams_seed % n_runs``), so a pool missing one run would
    silently give it another featurizer than planned. A borrowed pool (``aux_pool``) is
    complete by then (``check_aux_pool``).
    """
    by_out = {str(other.spec["out"]): other.key for runs in plan.values() for other in runs}
    keys = [
        by_out[str(run.spec[name])]
        for name in ("pretrained", "lp_head")
        if run.spec.get(name) is not None and str(run.spec[name]) in by_out
    ]
    if run.stage == "target" and run.spec.get("init", "pretrained") != "pretrained":
        keys += [aux.key for aux in plan.get("aux", [])]
    return keys
