"""Run a sweep's stages as Ray Tune experiments under ``<storage>/<name>/``.

Layout: ``sweep.json`` (the config, to refuse a different one under the same name),
``tune/<stage>/`` (Tune's experiment state, for ``Tuner.restore``),
``checkpoints/<stage>/<key>/`` (every run's checkpoint), ``results/`` (Parquet).

Resume: a stage whose checkpoints all exist is skipped; an unfinished stage is restored
(errored trials resumed); a trial whose checkpoint exists reports it without retraining.

Storage: ``<storage>`` is a local path or any ``pyarrow.fs`` URI (``s3://bucket/runs``);
every file goes through ``raysoup.io.storage``, and Tune gets the same filesystem.
"""

from __future__ import annotations

import json
import os
import sys

import ray
from ray import tune
from ray.actor import ActorHandle

from raysoup.io import storage as io_storage
from raysoup.io.checkpoint import CheckpointError
from raysoup.io.storage import Location
from raysoup.options import OptionsError
from raysoup.results.store import ResultsStore
from raysoup.soup.actor import SoupFeeder, actor_name, start_soup_actor
from raysoup.soup.greedy import rank_key
from raysoup.soup.group import GroupKey, Offer
from raysoup.soup.maker import METHODS, SoupMaker, describe
from raysoup.sweep.config import (
    ADDED_LATER,
    RECORD_VERSION,
    SweepConfig,
    adopt_record,
    config_from_record,
    parse_record,
)
from raysoup.sweep.lease import SweepLease
from raysoup.sweep.plan import PlannedRun, plan_sweep
from raysoup.sweep.trainable import run_trial, trial_row

CONFIG_FILE = "sweep.json"
RESULTS = "results"


class SweepError(RuntimeError):
    """A stage of the sweep could not finish."""


def experiment_root(storage: Location, name: str) -> Location:
    """``<storage>/<name>``: an absolute ``Path`` for a local storage, a URI string for a URI."""
    return io_storage.join(io_storage.resolve(storage), name)


def read_config(root: Location) -> SweepConfig:
    """The config a sweep under ``root`` was started with."""
    path = io_storage.join(root, CONFIG_FILE)
    if not io_storage.exists(path):
        raise FileNotFoundError(f"{root} holds no sweep: {CONFIG_FILE} is missing")
    return config_from_record(parse_record(io_storage.read_bytes(path), str(path)), str(path))


def record_config(root: Location, config: SweepConfig) -> SweepConfig:
    """Write the config on first run; refuse a different config under the same name.

    Returns the config to run: ``config`` itself, except when resuming a sweep recorded
    before ``RECORD_VERSION`` 2, which keeps the behaviour it was started with
    (``adopt_record``: e.g. ``target_keep: last``, one LP per trial seed, no aux LP).
    """
    path = io_storage.join(root, CONFIG_FILE)
    if io_storage.exists(path):
        stored = parse_record(io_storage.read_bytes(path), str(path))
        if stored.get("version", 1) < RECORD_VERSION:
            config, adopted = adopt_record(config, stored.get("config", {}))
            if adopted:
                print(
                    f"raysoup: {root} was recorded by an earlier raysoup: resuming it as it "
                    f"began, with {adopted} (a new --name runs today's defaults)",
                    file=sys.stderr,
                )
        if stored.get("fingerprint") != config.fingerprint():
            old, new = {**ADDED_LATER, **stored.get("config", {})}, config.to_dict()
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise OptionsError(
                f"{root} already holds sweep {config.name!r} with a different config "
                f"(changed: {changed}); use another --name, or the original config to resume"
            )
        return config
    record = {
        "version": RECORD_VERSION,
        "fingerprint": config.fingerprint(),
        "config": config.to_dict(),
    }
    io_storage.write_bytes_atomic(path, json.dumps(record, indent=2).encode())
    return config


def _trial_config(run: PlannedRun, root: Location, config: SweepConfig) -> dict:
    """What one Tune trial receives: JSON-ready (paths as strings)."""
    spec = json.loads(json.dumps(run.spec, default=str))
    results = str(io_storage.join(root, RESULTS))
    return {"key": run.key, "spec": spec, "sweep": config.name, "results": results}


def _tune_storage(root: Location) -> dict:
    """Tune's ``storage_path`` (and ``storage_filesystem`` for a URI) for ``<root>/tune``."""
    if not io_storage.is_uri(root):
        return {"storage_path": str(io_storage.join(root, "tune"))}
    fs, path = io_storage.filesystem(io_storage.join(root, "tune"))
    return {"storage_path": path, "storage_filesystem": fs}


def runs_to_do(runs: list[PlannedRun]) -> list[PlannedRun]:
    """The runs without an intact checkpoint. A damaged one (truncated weights, a header
    that does not fit the file) is retrained: said, not silently reused."""
    todo = []
    for run in runs:
        out = run.spec["out"]
        if not io_storage.is_checkpoint(out):
            todo.append(run)
        elif (why := io_storage.checkpoint_damage(out)) is not None:
            print(
                f"raysoup: warning: {run.key}: damaged checkpoint, retraining it ({why})",
                file=sys.stderr,
            )
            todo.append(run)
    return todo


def restore_trial_rows(runs: list[PlannedRun], root: Location, config: SweepConfig) -> None:
    """Write the ``trials`` row of every finished run that has none (its part was damaged
    and set aside, or the trial ended between its checkpoint and its row): the row is a
    function of the checkpoint's metadata, so nothing reported is ever lost."""
    store = ResultsStore(str(io_storage.join(root, RESULTS)))
    have = store.part_keys("trials")
    for run in runs:
        if run.key not in have and io_storage.is_checkpoint(run.spec["out"]):
            meta = io_storage.read_meta(run.spec["out"])
            row = trial_row(config.name, run.key, meta, run.spec["out"])
            store.append("trials", [row], part_key=run.key)


def run_stage(
    stage: str,
    runs: list[PlannedRun],
    root: Location,
    config: SweepConfig,
    callbacks: list[tune.Callback] | None = None,
) -> None:
    todo = runs_to_do(runs)
    restore_trial_rows(runs, root, config)
    if not todo:
        print(f"raysoup: stage {stage}: all {len(runs)} runs done, skipped", file=sys.stderr)
        return
    print(f"raysoup: stage {stage}: {len(todo)} of {len(runs)} runs to do", file=sys.stderr)
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    trainable = tune.with_resources(run_trial, resources)
    tune_storage = _tune_storage(root)
    path = f"{tune_storage['storage_path']}/{stage}"
    filesystem = tune_storage.get("storage_filesystem")
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        # The callbacks come back from the saved experiment state.
        tuner = tune.Tuner.restore(
            path, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"run": tune.grid_search([_trial_config(r, root, config) for r in runs])},
            tune_config=tune.TuneConfig(max_concurrent_trials=config.max_concurrent_trials or None),
            run_config=tune.RunConfig(
                name=stage,
                **tune_storage,
                failure_config=tune.FailureConfig(max_failures=config.max_failures),
                callbacks=list(callbacks or []),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    restore_trial_rows(runs, root, config)
    missing = [run.key for run in runs if not io_storage.is_checkpoint(run.spec["out"])]
    if missing or grid.errors:
        raise SweepError(
            f"stage {stage}: {len(missing)} run(s) did not finish ({missing[:5]}); "
            f"errors: {[str(e).splitlines()[0] for e in grid.errors[:3]]}. "
            f"Run the same command again to resume."
        )


def run_sweep(config: SweepConfig, storage: Location) -> Location:
    """Run (or resume) every stage under ``storage`` (a local path or a URI); returns the
    experiment root (a ``Path`` for local storage, a URI string otherwise)."""
    config.validate()
    root = experiment_root(storage, config.name)
    io_storage.check_writable(root)  # a file, a read-only disk, a missing bucket: say so now
    with SweepLease(root):
        _run_sweep_held(config, root)
    return root


def _run_sweep_held(config: SweepConfig, root: Location) -> None:
    """``run_sweep`` once this driver holds the sweep's lease."""
    config = record_config(root, config)
    plan = plan_sweep(config, root)
    for damaged in ResultsStore(str(io_storage.join(root, RESULTS))).set_aside_damaged():
        print(f"raysoup: warning: set aside damaged {damaged}; rewriting it", file=sys.stderr)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    for stage, runs in plan.items():
        if stage != "target":
            run_stage(stage, runs, root, config)
            continue
        soup = start_soup(root, config, runs)
        run_stage(stage, runs, root, config, callbacks=[SoupFeeder(actor_name(config.name, root))])
        hand_over(soup, runs)  # idempotent: whatever the actor already has is skipped
        for row in ray.get(soup.finalize.remote()):
            print(f"raysoup: soup {describe(row)}", file=sys.stderr)
        for group in ray.get(soup.summary.remote()):
            if group["trials"] < group["expected"]:
                print(
                    f"raysoup: warning: soups of {group['group']} use {group['trials']} of "
                    f"{group['expected']} trials (see the soup actor's log)",
                    file=sys.stderr,
                )


def start_soup(root: Location, config: SweepConfig, runs: list[PlannedRun]) -> ActorHandle:
    """The sweep's soup actor, handed every target trial that already finished (a resume:
    trials completed while no actor was listening)."""
    expected: dict[GroupKey, list[str]] = {}
    for run in runs:
        spec = run.spec
        key = GroupKey(spec["dataset"], spec["test_env"], spec["trial_seed"], spec["init"])
        expected.setdefault(key, []).append(run.key)
    soup = start_soup_actor(
        root,
        config.name,
        expected,
        num_cpus=config.soup_cpus,
        num_gpus=config.soup_gpus,
        accept=config.soup_accept,
        data_dir=config.data_dir,
        holdout_fraction=config.holdout_fraction,
        max_models=config.soup_max_models,
    )
    hand_over(soup, runs)
    return soup


def hand_over(soup: ActorHandle, runs: list[PlannedRun]) -> None:
    """Offer every finished target trial to the actor (fire-and-forget)."""
    offers = [offer.to_dict() for offer in finished_offers(runs)]
    if offers:
        soup.offer.remote(offers)


def finished_offers(runs: list[PlannedRun]) -> list[Offer]:
    """The soup offers of the planned runs whose checkpoint exists, from their metadata."""
    return [
        Offer.from_checkpoint(run.key, run.spec["out"])
        for run in runs
        if io_storage.is_checkpoint(run.spec["out"])
    ]


def resoup(
    root: Location,
    methods: tuple[str, ...] = METHODS,
    accept: str | None = None,
    device: str = "auto",
) -> list[dict]:
    """Recompute a sweep's soups from its trial checkpoints, without Ray or retraining.

    Writes the same ``soups`` / ``soup_steps`` parts (and soup checkpoints) as the actor,
    replacing them; ``accept`` defaults to the sweep's ``soup_accept``.
    """
    root = io_storage.resolve(root)
    config = read_config(root)
    with SweepLease(root):  # never next to a running sweep's soup actor
        return _resoup_held(root, config, methods, accept, device)


def _resoup_held(
    root: Location, config: SweepConfig, methods: tuple[str, ...], accept: str | None, device: str
) -> list[dict]:
    runs = plan_sweep(config, root).get("target", [])
    offers = finished_offers(runs)
    if not offers:
        raise FileNotFoundError(f"{root}: no finished target trial to soup")
    damaged = [(o.checkpoint, why) for o in offers if (why := io_storage.verify(o.checkpoint))]
    if damaged:  # before any soup is replaced: a soup must not silently lose a trial
        listed = "; ".join(f"{path}: {why}" for path, why in damaged[:5])
        raise CheckpointError(
            f"{len(damaged)} trial checkpoint(s) are damaged ({listed}). Delete the damaged "
            f"folder(s) and run the sweep's command again (it retrains exactly those "
            f"runs), then soup again"
        )
    # Best first, each trial is decided once: the batch order of Recipe 1, fewest evaluations.
    offers.sort(key=lambda offer: rank_key(offer.candidate))
    maker = SoupMaker(
        root,
        config.name,
        accept=accept or config.soup_accept,
        data_dir=config.data_dir,
        holdout_fraction=config.holdout_fraction,
        device=device,
        max_models=config.soup_max_models,
        methods=methods,
        persist=False,
    )
    maker.offer(offers)
    return maker.finalize_all()
