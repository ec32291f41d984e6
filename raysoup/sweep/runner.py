"""Run a sweep's runs as one Ray Tune experiment under ``<storage>/<name>/``.

Layout: ``raysoup.io.layout.SweepLayout`` (the config record refuses a different config
under the same name).

Scheduling: every run of every stage is a trial of one experiment, and they share its
slots; a run starts as soon as the runs it starts from (its base, its LP head, the
auxiliary runs of its init) are done (``raysoup.sweep.schedule``). Trials run in
long-lived worker processes that Tune reuses from trial to trial.

Resume: the runs with an intact checkpoint are done and never trained again; a new
experiment runs the rest (a damaged checkpoint is retrained, said on stderr). A sweep with
nothing left to train starts no Ray: its soups are finished in the driver.

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
import math
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

from raysoup.contract import HPARAM_COLUMNS
from raysoup.data.registry import dataset_class
from raysoup.errors import EXIT_RUNS_FAILED, RunsFailedError, SweepError
from raysoup.io import storage as io_storage
from raysoup.io.layout import TUNE_EXPERIMENT, SweepLayout
from raysoup.io.storage import Location
from raysoup.results.store import ResultsStore
from raysoup.soup.maker import describe
from raysoup.soup.posthoc import finished_offers, incomplete_groups, planned_groups, soup_here
from raysoup.sweep.cluster import ray_session
from raysoup.sweep.config import SweepConfig
from raysoup.sweep.lease import SweepLease
from raysoup.sweep.plan import PlannedRun, dependencies, plan_sweep
from raysoup.sweep.progress import SweepProgress
from raysoup.sweep.record import record_config
from raysoup.sweep.schedule import PlanSearcher
from raysoup.sweep.soup_actor import SoupFeeder, actor_name, start_soup_actor
from raysoup.sweep.trainable import run_trial, trial_row
from raysoup.training.hparams import sample_hparams

EXIT_TRIALS_FAILED = EXIT_RUNS_FAILED  # `raysoup run`: the sweep ended, some runs failed


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


class TrialsFailedError(RunsFailedError):
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


def _trial_config(run: PlannedRun, root: Location, config: SweepConfig) -> dict:
    """What one Tune trial receives: JSON-ready (paths as strings)."""
    spec = json.loads(json.dumps(run.spec, default=str))
    results = str(SweepLayout(root).results)
    return {"key": run.key, "spec": spec, "sweep": config.name, "results": results}


def _tune_storage(root: Location) -> dict:
    """Tune's ``storage_path`` (and ``storage_filesystem`` for a URI) for ``<root>/tune``."""
    tune_root = SweepLayout(root).tune
    if not io_storage.is_uri(tune_root):
        return {"storage_path": str(tune_root)}
    fs, path = io_storage.filesystem(tune_root)
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
    store = ResultsStore(str(SweepLayout(root).results))
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
        path = SweepLayout(root).failure(run.stage, run.key)
        io_storage.write_bytes_atomic(path, text.encode())
        error_file = str(path)
    failure = Failure(run.stage, run.key, error, error_file or "")
    store = ResultsStore(str(SweepLayout(root).results))
    store.append("trials", [failed_row(config.name, run, failure)], part_key=run.key)
    return failure


def _trial_keys(path: str, filesystem: Any = None) -> dict[str, str]:
    """``{trial folder: run key}`` of the Tune experiment at ``path``, from its saved
    trial configs (a ``Result`` of a trial that errored before reporting, read back from
    storage, has no config)."""
    analysis = tune.ExperimentAnalysis(path, storage_filesystem=filesystem)
    return {trial.path: trial.config["run"]["key"] for trial in analysis.trials}


MAX_PENDING = "TUNE_MAX_PENDING_TRIALS_PG"


def trial_slots(config: SweepConfig, resources: Mapping[str, float]) -> int:
    """How many trials of ``config`` fit side by side on a cluster with ``resources``
    (``ray.cluster_resources()``) beside the soup actor's reservation (``soup_cpus``,
    ``soup_gpus``), capped by ``max_concurrent_trials``; at least 1."""
    cpus = resources.get("CPU", 0.0) - config.soup_cpus
    slots = math.floor(cpus / config.cpus_per_trial + 1e-9)
    if config.gpus_per_trial > 0:
        gpus = resources.get("GPU", 0.0) - config.soup_gpus
        slots = min(slots, math.floor(gpus / config.gpus_per_trial + 1e-9))
    if config.max_concurrent_trials:
        slots = min(slots, config.max_concurrent_trials)
    return max(1, slots)


def fit_staging(tuner: tune.Tuner, depth: int) -> tune.ResultGrid:
    """``tuner.fit()``, letting Tune stage up to ``depth`` trials (at most 200) ahead.
    With a custom searcher Tune stages one trial at a time by default, which runs the
    trials one after another whatever the free slots. Tune starts staged trials in the
    order they were staged, so staging every ready run would make a run that becomes
    ready later (an auxiliary run, which unblocks many targets) wait behind all of them:
    ``depth`` = the number of slots keeps ``PlanSearcher``'s order. A
    ``TUNE_MAX_PENDING_TRIALS_PG`` set by the user is left as it is."""
    before = os.environ.get(MAX_PENDING)
    if before not in (None, "auto"):
        return tuner.fit()
    os.environ[MAX_PENDING] = str(max(1, min(depth, 200)))
    try:
        return tuner.fit()
    finally:
        if before is None:
            os.environ.pop(MAX_PENDING, None)
        else:
            os.environ[MAX_PENDING] = before


def _fit(
    name: str,
    runs: list[PlannedRun],
    waits_for: Mapping[str, list[str]],
    root: Location,
    config: SweepConfig,
    callbacks: list[tune.Callback] | None,
) -> tuple[dict[str, BaseException | str | None], dict[str, str]]:
    """Run ``runs`` as one Tune experiment ``name``, each as soon as the runs it
    ``waits_for`` are done. Returns ``({key: error}`` of the trials that ended in an
    error, ``{key: failed run}`` of those never started because a run they need failed).

    Trials run in long-lived worker processes (``reuse_actors``, unless
    ``config.reuse_workers`` is off): a trial pays no process start and no torch import,
    and ``train_run`` reseeds everything, so its result is the same bits as in a fresh
    process. A resumed sweep is a new experiment planned from the
    checkpoints (never ``Tuner.restore``: a finished run is never trained twice, a damaged
    one always is).
    """
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    tune_storage = _tune_storage(root)
    searcher = PlanSearcher({run.key: _trial_config(run, root, config) for run in runs}, waits_for)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=len(runs),
            max_concurrent_trials=config.max_concurrent_trials or None,
            reuse_actors=config.reuse_workers,
        ),
        run_config=tune.RunConfig(
            name=name,
            **tune_storage,
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            callbacks=list(callbacks or []),
            verbose=config.tune_verbose,
        ),
    )
    slots = trial_slots(config, ray.cluster_resources())
    grid = fit_staging(tuner, min(len(runs), slots))
    blocked = dict(searcher.queue.blocked)
    if not grid.errors:
        return {}, blocked
    path = f"{tune_storage['storage_path']}/{name}"
    keys_by_path = _trial_keys(path, tune_storage.get("storage_filesystem"))
    errors = {
        keys_by_path.get(result.path, ""): result.error
        for result in grid
        if result.error is not None
    }
    return errors, blocked


def _record_not_attempted(
    root: Location,
    config: SweepConfig,
    run: PlannedRun,
    causes: list[str],
    failed: Mapping[str, Failure],
) -> Failure:
    """The failure of a run never started because the runs ``causes`` it needs failed."""
    cause = failed[causes[0]]
    error = f"not attempted: depends on failed run(s) {causes} ({cause.error})"
    return record_failure(root, config, run, error, error_file=cause.error_file)


def run_runs(
    name: str,
    runs: list[PlannedRun],
    root: Location,
    config: SweepConfig,
    callbacks: list[tune.Callback] | None = None,
    *,
    plan: Mapping[str, list[PlannedRun]] | None = None,
    failed: Mapping[str, Failure] | None = None,
    missing: list[PlannedRun] | None = None,
) -> list[Failure]:
    """Run the unfinished ``runs`` (of any stages) in one Tune experiment ``name``; a run
    starts as soon as the runs of ``plan`` it starts from are done. Returns the runs that
    failed, or could not start because a run they need failed (here or in ``failed``).
    ``missing``: ``runs_to_do(runs)`` when the caller has it (each checkpoint checked once)."""
    plan = plan or {}
    missing = runs_to_do(runs) if missing is None else missing
    restore_trial_rows(runs, root, config)
    failed = dict(failed or {})
    every = {**plan, "_": runs}  # the runs' dependencies may lie in other stages of the plan
    blocked = blocked_runs(missing, every, failed)
    failures = [
        _record_not_attempted(root, config, run, blocked[run.key], failed)
        for run in missing
        if run.key in blocked
    ]
    todo = [run for run in missing if run.key not in blocked]
    for stage in dict.fromkeys(run.stage for run in runs):
        n_runs = sum(run.stage == stage for run in runs)
        n_todo = sum(run.stage == stage for run in todo)
        n_blocked = sum(run.stage == stage and run.key in blocked for run in missing)
        if n_todo == n_blocked == 0:
            print(f"raysoup: stage {stage}: all {n_runs} runs done, skipped", file=sys.stderr)
        else:
            print(
                f"raysoup: stage {stage}: {n_todo} of {n_runs} runs to do"
                + (f", {n_blocked} blocked by failed runs" if n_blocked else ""),
                file=sys.stderr,
            )
    if not todo:
        return failures
    todo_keys = {run.key for run in todo}
    waits_for = {
        run.key: [key for key in dependencies(run, every) if key in todo_keys] for run in todo
    }
    errors, not_started = _fit(name, todo, waits_for, root, config, callbacks)
    restore_trial_rows(runs, root, config)
    missing = runs_to_do(todo, quiet=True)
    for run in (run for run in missing if run.key in errors):
        error = errors[run.key]
        failure = record_failure(root, config, run, error_summary(error), error_text(error))
        failed[run.key] = failure
        failures.append(failure)
    failures += [
        _record_not_attempted(root, config, run, [not_started[run.key]], failed)
        for run in missing
        if run.key in not_started
    ]
    unfinished = [
        run.key for run in missing if run.key not in errors and run.key not in not_started
    ]
    if unfinished:  # no error: Tune stopped early (Ctrl-C), not a failure of these runs
        raise SweepError(
            f"{len(unfinished)} run(s) did not finish ({unfinished[:5]}). "
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
    root = SweepLayout.of(storage, config.name).root
    io_storage.check_writable(root)  # a file, a read-only disk, a missing bucket: say so now
    with SweepLease(root):
        _run_sweep_held(config, root)
    return root


def _run_sweep_held(config: SweepConfig, root: Location) -> None:
    """``run_sweep`` once this driver holds the sweep's lease."""
    config = record_config(root, config)
    plan = plan_sweep(config, root)
    for damaged in ResultsStore(str(SweepLayout(root).results)).set_aside_damaged():
        print(f"raysoup: warning: set aside damaged {damaged}; rewriting it", file=sys.stderr)
    targets = plan.get("target", [])
    every = [run for runs in plan.values() for run in runs]
    missing = runs_to_do(every)
    if not missing:  # nothing to train: no Ray, soups made here
        failures = run_runs(TUNE_EXPERIMENT, every, root, config, plan=plan, missing=missing)
        written, summary = soup_here(root, config, targets) if targets else ([], [])
    else:
        failures, written, summary = _run_with_ray(root, config, plan, every, missing, targets)
    for row in written:
        print(f"raysoup: soup {describe(row)}", file=sys.stderr)
    if targets:
        for line in incomplete_groups(planned_groups(targets), summary):
            print(f"raysoup: warning: {line}", file=sys.stderr)
    if failures:
        error = TrialsFailedError(root, failures)
        print(f"raysoup: warning: {error}", file=sys.stderr)
        raise error


def _run_with_ray(
    root: Location,
    config: SweepConfig,
    plan: Mapping[str, list[PlannedRun]],
    every: list[PlannedRun],
    missing: list[PlannedRun],
    targets: list[PlannedRun],
) -> tuple[list[Failure], list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``missing`` runs of ``every`` on Ray Tune, souped by the soup actor as they
    finish: ``(failures, soup rows written at the end, soup summary)``."""
    with ray_session():
        todo = {run.key for run in missing}
        progress = SweepProgress(
            {run.key: run.stage for run in every},
            [run.key for run in every if run.key not in todo],
            soup_actor=actor_name(config.name, root) if targets else None,
        )
        callbacks: list[tune.Callback] = [progress]
        if targets:  # listening before any trial starts: a target may finish early
            soup = start_soup(root, config, targets)
            callbacks.append(soup_feeder(root, config))
        failures = run_runs(
            TUNE_EXPERIMENT, every, root, config, callbacks, plan=plan, missing=missing
        )
        if not targets:
            return failures, [], []
        hand_over(soup, targets)  # idempotent: whatever the actor already has is skipped
        # Groups with failed trials never complete: finalize them with the trials there are.
        written = ray.get(soup.finalize.remote())
        return failures, written, ray.get(soup.summary.remote())


def run_sweep_status(config: SweepConfig, storage: Location) -> tuple[Location, int]:
    """``run_sweep`` for commands and scripts: ``(root, exit code)``, the code 0 or
    ``EXIT_TRIALS_FAILED`` when some runs failed (listed on stderr by then), so that the
    caller still prints the results of everything else."""
    try:
        return run_sweep(config, storage), 0
    except TrialsFailedError as error:
        return error.root, EXIT_TRIALS_FAILED


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


def soup_feeder(root: Location, config: SweepConfig) -> SoupFeeder:
    """The Tune callback that hands the sweep's finished target trials to its soup actor."""
    return SoupFeeder(actor_name(config.name, root), every_s=config.soup_every_s)


def hand_over(soup: ActorHandle, runs: list[PlannedRun]) -> None:
    """Offer every finished target trial to the actor (fire-and-forget)."""
    offers = finished_offers(runs)
    if offers:
        soup.offer.remote(offers)
