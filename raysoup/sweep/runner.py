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

from raysoup.io import storage as io_storage
from raysoup.io.storage import Location
from raysoup.options import OptionsError
from raysoup.sweep.config import SweepConfig
from raysoup.sweep.plan import PlannedRun, plan_sweep
from raysoup.sweep.trainable import run_trial

CONFIG_FILE = "sweep.json"
RESULTS = "results"


class SweepError(RuntimeError):
    """A stage of the sweep could not finish."""


def experiment_root(storage: Location, name: str) -> Location:
    """``<storage>/<name>``: an absolute ``Path`` for a local storage, a URI string for a URI."""
    return io_storage.join(io_storage.resolve(storage), name)


def record_config(root: Location, config: SweepConfig) -> None:
    """Write the config on first run; refuse a different config under the same name."""
    path = io_storage.join(root, CONFIG_FILE)
    if io_storage.exists(path):
        stored = json.loads(io_storage.read_bytes(path))
        if stored.get("fingerprint") != config.fingerprint():
            old, new = stored.get("config", {}), config.to_dict()
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise OptionsError(
                f"{root} already holds sweep {config.name!r} with a different config "
                f"(changed: {changed}); use another --name, or the original config to resume"
            )
        return
    record = {"fingerprint": config.fingerprint(), "config": config.to_dict()}
    io_storage.write_bytes_atomic(path, json.dumps(record, indent=2).encode())


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


def run_stage(stage: str, runs: list[PlannedRun], root: Location, config: SweepConfig) -> None:
    todo = [run for run in runs if not io_storage.is_checkpoint(run.spec["out"])]
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
                verbose=1,
            ),
        )
    grid = tuner.fit()
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
    record_config(root, config)
    plan = plan_sweep(config, root)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    for stage, runs in plan.items():
        run_stage(stage, runs, root, config)
    return root
