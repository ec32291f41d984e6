"""Run a sweep's stages as Ray Tune experiments under ``<storage>/<name>/``.

Layout: ``sweep.json`` (the config, to refuse a different one under the same name),
``tune/<stage>/`` (Tune's experiment state, for ``Tuner.restore``),
``checkpoints/<stage>/<key>/`` (every run's checkpoint), ``failures/<stage>/<key>.txt``
(a failed run's full error), ``results/`` (Parquet).

Resume: a stage whose checkpoints all exist is skipped; an unfinished stage is restored
(errored trials resumed; a new experiment when runs blocked last time can run now); a
trial whose checkpoint exists reports it without retraining.

Failures: a run that still fails after ``max_failures`` retries gets a ``trials`` row with
``status = "failed"``, the first line of its error and ``error_file``, the full text under
``failures/<stage>/<key>.txt``; runs that start from its checkpoint are not attempted
(failed too, naming it); everything else goes on, and the soups use the trials there are.
``run_sweep`` then raises ``TrialsFailedError`` (``raysoup run`` exits with
``EXIT_TRIALS_FAILED``); the same command again retries the failed runs alone.

Storage: ``<storage>`` is a local path or any ``pyarrow.fs`` URI (``s3://bucket/runs``);
every file goes through ``raysoup.io.storage``, and Tune gets the same filesystem.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.actor import ActorHandle

from raysoup.data.registry import dataset_class
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
from raysoup.sweep.plan import PlannedRun, dependencies, plan_sweep
from raysoup.sweep.trainable import HPARAM_COLUMNS, run_trial, trial_row
from raysoup.training.hparams import sample_hparams

CONFIG_FILE = "sweep.json"
RESULTS = "results"
FAILURES = "failures"  # <root>/failures/<stage>/<key>.txt: the full error of a failed run
EXIT_TRIALS_FAILED = 3  # `raysoup run`: the sweep ended, but some runs failed


class SweepError(RuntimeError):
    """A stage of the sweep could not finish."""


@dataclass(frozen=True)
class Failure:
    """A run that failed (after its retries), or was not attempted because a run it
    starts from failed."""

    stage: str
    key: str
    error: str  # one line
    error_file: str  # where the full error is (a blocked run: its dependency's)

    def describe(self) -> str:
        return f"{self.key}: {self.error} (see {self.error_file})"


class TrialsFailedError(SweepError):
    """The sweep ended with soups of every run that could finish, but some runs failed;
    the same command again retries them."""

    def __init__(self, root: Location, failures: list[Failure]) -> None:
        self.root = root
        self.failures = failures
        lines = [f"  {failure.describe()}" for failure in failures]
        super().__init__(
            f"{len(failures)} run(s) failed; the soups use the others. Run the same command "
            f"again to retry them:\n" + "\n".join(lines)
        )


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


def runs_to_do(runs: list[PlannedRun], quiet: bool = False) -> list[PlannedRun]:
    """The runs without an intact checkpoint. A damaged one (truncated weights, a header
    that does not fit the file) is retrained: said, not silently reused."""
    todo = []
    for run in runs:
        out = run.spec["out"]
        if not io_storage.is_checkpoint(out):
            todo.append(run)
        elif (why := io_storage.checkpoint_damage(out)) is not None:
            if not quiet:
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


# The line naming the exception at the end of a traceback, e.g. "ValueError: bad value".
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*$")
TRACEBACK = "Traceback (most recent call last)"


def error_summary(error: BaseException | str | None) -> str:
    """One line naming what went wrong: the exception's type and first line. A
    ``RayTaskError`` carries the trial's own exception as ``cause``; an error read back
    from Tune's storage can be traceback text, whose last exception line is taken."""
    if error is None:
        return "the run did not finish and Tune recorded no error"
    cause = getattr(error, "cause", None)
    error = cause if isinstance(cause, BaseException) else error
    lines = str(error).strip().splitlines()
    if isinstance(error, BaseException) and not any(TRACEBACK in line for line in lines):
        return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    named = [line for line in lines if EXCEPTION_LINE.match(line)]
    return named[-1] if named else (lines[0] if lines else "unknown error")


def error_text(error: BaseException | str | None) -> str:
    """The full error of a failed run (a ``RayTaskError``'s text holds the remote traceback)."""
    if error is None:
        return error_summary(None) + "\n"
    if isinstance(error, str) or getattr(error, "cause", None) is not None:
        return str(error) + "\n"
    return "".join(traceback.format_exception(error))


def failure_file(root: Location, stage: str, key: str) -> Location:
    return io_storage.join(root, FAILURES, stage, f"{key}.txt")


def failed_row(sweep: str, run: PlannedRun, failure: Failure) -> dict[str, Any]:
    """The ``trials`` row of a failed run, from its plan alone (no checkpoint exists)."""
    spec = run.spec
    row: dict[str, Any] = {
        "sweep": sweep,
        "stage": run.stage,
        "trial_id": run.key,
        "dataset": spec["dataset"],
        "test_env": spec["test_env"],
        "trial_seed": spec.get("trial_seed", 0),
        "hparams_seed": spec.get("hparams_seed", 0),
        "init": spec.get("init", "pretrained") if run.stage == "target" else None,
        "status": "failed",
        "error": failure.error,
        "error_file": failure.error_file or None,
    }
    if run.stage != "base":  # the hyperparameters it failed with (e.g. a diverging lr)
        hparams = sample_hparams(
            spec["dataset"],
            row["hparams_seed"],
            row["trial_seed"],
            registry=spec.get("hparams_registry", "diwa"),
            small_images=dataset_class(spec["dataset"]).SMALL_IMAGES,
            hparams_depend_on_trial_seed=spec.get("hparams_depend_on_trial_seed", False),
            overrides=spec.get("hparams"),
        )
        row.update({k: hparams[k] for k in HPARAM_COLUMNS if k in hparams})
        row["steps"] = spec.get("steps")
    return row


def blocked_runs(
    runs: list[PlannedRun],
    plan: Mapping[str, list[PlannedRun]],
    failed: Mapping[str, Failure],
) -> dict[str, list[str]]:
    """``{key: failed dependencies}`` of the runs that cannot start: one of the runs whose
    checkpoint they start from failed (``plan.dependencies``)."""
    blocked = {}
    for run in runs:
        missing = [key for key in dependencies(run, dict(plan)) if key in failed]
        if missing:
            blocked[run.key] = missing
    return blocked


def record_failure(
    root: Location,
    config: SweepConfig,
    run: PlannedRun,
    error: str,
    text: str | None = None,
    error_file: str | None = None,
) -> Failure:
    """Write a failed run's ``trials`` row (the done row's part: a later success replaces
    it) and, given ``text``, its error file; else ``error_file`` names the root cause's."""
    if text is not None:
        path = failure_file(root, run.stage, run.key)
        io_storage.write_bytes_atomic(path, text.encode())
        error_file = str(path)
    failure = Failure(run.stage, run.key, error, error_file or "")
    store = ResultsStore(str(io_storage.join(root, RESULTS)))
    store.append("trials", [failed_row(config.name, run, failure)], part_key=run.key)
    return failure


def _trial_keys(path: str, filesystem: Any = None) -> dict[str, str]:
    """``{trial folder: run key}`` of the Tune experiment at ``path``, from its saved
    trial configs (a ``Result`` of a trial that errored before reporting, read back from
    storage, has no config)."""
    analysis = tune.ExperimentAnalysis(path, storage_filesystem=filesystem)
    return {trial.path: trial.config["run"]["key"] for trial in analysis.trials}


def _restorable(path: str, filesystem: Any, keys: set[str], todo: set[str]) -> bool:
    """Whether restoring the saved Tune experiment at ``path`` would run every run in
    ``todo``: it holds a trial for every key (it does not when runs blocked by a failed
    dependency last time can run now), and none of ``todo`` ended there (a run that
    finished but whose checkpoint was since damaged or deleted is not rerun by a restore)."""
    try:
        analysis = tune.ExperimentAnalysis(path, storage_filesystem=filesystem)
        status = {trial.config["run"]["key"]: trial.status for trial in analysis.trials}
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: start afresh
        return False
    return keys <= set(status) and all(status[key] != "TERMINATED" for key in todo)


def _fit(
    stage: str,
    runs: list[PlannedRun],
    root: Location,
    config: SweepConfig,
    callbacks: list[tune.Callback] | None,
    todo: set[str],
) -> dict[str, BaseException | str | None]:
    """Run ``runs`` with Tune (restoring the stage's experiment if that reruns ``todo``);
    returns ``{key: error}`` of the trials that ended in an error."""
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    trainable = tune.with_resources(run_trial, resources)
    tune_storage = _tune_storage(root)
    path = f"{tune_storage['storage_path']}/{stage}"
    filesystem = tune_storage.get("storage_filesystem")
    keys = {run.key for run in runs}
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem) and _restorable(
        path, filesystem, keys, todo
    ):
        # The callbacks come back from the saved experiment state.
        tuner = tune.Tuner.restore(
            path, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    else:  # a new experiment in the same folder (Tune restores the newest)
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
    if not grid.errors:
        return {}
    keys_by_path = _trial_keys(path, filesystem)
    return {
        keys_by_path.get(result.path, ""): result.error
        for result in grid
        if result.error is not None
    }


def run_stage(
    stage: str,
    runs: list[PlannedRun],
    root: Location,
    config: SweepConfig,
    callbacks: list[tune.Callback] | None = None,
    *,
    plan: Mapping[str, list[PlannedRun]] | None = None,
    failed: Mapping[str, Failure] | None = None,
) -> list[Failure]:
    """Run a stage's unfinished runs; returns those that failed, or could not start
    because a run in ``failed`` (earlier stages) they depend on failed."""
    missing = runs_to_do(runs)
    restore_trial_rows(runs, root, config)
    if not missing:
        print(f"raysoup: stage {stage}: all {len(runs)} runs done, skipped", file=sys.stderr)
        return []
    failed = failed or {}
    blocked = blocked_runs(missing, plan or {stage: runs}, failed)
    failures = []
    for run in (run for run in missing if run.key in blocked):
        cause = failed[blocked[run.key][0]]
        error = f"not attempted: depends on failed run(s) {blocked[run.key]} ({cause.error})"
        failures.append(record_failure(root, config, run, error, error_file=cause.error_file))
    todo = [run for run in missing if run.key not in blocked]
    print(
        f"raysoup: stage {stage}: {len(todo)} of {len(runs)} runs to do"
        + (f", {len(blocked)} blocked by failed runs" if blocked else ""),
        file=sys.stderr,
    )
    if not todo:
        return failures
    # Done runs come along (they re-report without retraining); blocked ones cannot.
    errors = _fit(
        stage,
        [run for run in runs if run.key not in blocked],
        root,
        config,
        callbacks,
        todo={run.key for run in todo},
    )
    restore_trial_rows(runs, root, config)
    missing = runs_to_do(todo, quiet=True)
    for run in (run for run in missing if run.key in errors):
        error = errors[run.key]
        failures.append(record_failure(root, config, run, error_summary(error), error_text(error)))
    unfinished = [run.key for run in missing if run.key not in errors]
    if unfinished:  # no error: Tune stopped early (Ctrl-C), not a failure of these runs
        raise SweepError(
            f"stage {stage}: {len(unfinished)} run(s) did not finish ({unfinished[:5]}). "
            f"Run the same command again to resume."
        )
    return failures


def run_sweep(config: SweepConfig, storage: Location) -> Location:
    """Run (or resume) every stage under ``storage`` (a local path or a URI); returns the
    experiment root (a ``Path`` for local storage, a URI string otherwise).

    Raises ``TrialsFailedError`` (its ``root`` is that root) once every stage is over and
    every soup written when some runs failed; the warning lists them on stderr.
    """
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
    failed: dict[str, Failure] = {}
    for stage, runs in plan.items():
        callbacks = []
        if stage == "target":
            soup = start_soup(root, config, runs)
            callbacks = [SoupFeeder(actor_name(config.name, root))]
        for failure in run_stage(stage, runs, root, config, callbacks, plan=plan, failed=failed):
            failed[failure.key] = failure
        if stage != "target":
            continue
        hand_over(soup, runs)  # idempotent: whatever the actor already has is skipped
        # Groups with failed trials never complete: finalize them with the trials there are.
        for row in ray.get(soup.finalize.remote()):
            print(f"raysoup: soup {describe(row)}", file=sys.stderr)
        summary = ray.get(soup.summary.remote())
        for line in incomplete_groups(planned_groups(runs), summary):
            print(f"raysoup: warning: {line}", file=sys.stderr)
    if failed:
        error = TrialsFailedError(root, list(failed.values()))
        print(f"raysoup: warning: {error}", file=sys.stderr)
        raise error


def run_sweep_status(config: SweepConfig, storage: Location) -> tuple[Location, int]:
    """``run_sweep`` for commands and scripts: ``(root, exit code)``, the code 0 or
    ``EXIT_TRIALS_FAILED`` when some runs failed (listed on stderr by then), so that the
    caller still prints the results of everything else."""
    try:
        return run_sweep(config, storage), 0
    except TrialsFailedError as error:
        return error.root, EXIT_TRIALS_FAILED


def planned_groups(runs: list[PlannedRun]) -> dict[GroupKey, list[str]]:
    """The target runs of each soup group (dataset, test env, trial seed, init)."""
    groups: dict[GroupKey, list[str]] = {}
    for run in runs:
        spec = run.spec
        key = GroupKey(spec["dataset"], spec["test_env"], spec["trial_seed"], spec["init"])
        groups.setdefault(key, []).append(run.key)
    return groups


def incomplete_groups(
    planned: Mapping[GroupKey, list[str]], summary: list[dict[str, Any]]
) -> list[str]:
    """One line per soup group with fewer trials than planned (none: no soups at all)."""
    souped = {group["group"]: group["trials"] for group in summary}
    lines = []
    for key, runs in sorted(planned.items()):
        n = souped.get(key.slug, 0)
        if n == 0:
            lines.append(f"no trial of {key.slug} finished: it has no soups")
        elif n < len(runs):
            lines.append(f"soups of {key.slug} use {n} of {len(runs)} planned trials")
    return lines


def start_soup(root: Location, config: SweepConfig, runs: list[PlannedRun]) -> ActorHandle:
    """The sweep's soup actor, handed every target trial that already finished (a resume:
    trials completed while no actor was listening)."""
    soup = start_soup_actor(
        root,
        config.name,
        planned_groups(runs),
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
        expected=planned_groups(runs),
    )
    maker.offer(offers)
    return maker.finalize_all()
