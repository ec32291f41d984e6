"""Trials in reused Tune workers: one process trains run after run, across stages, and a
trial's checkpoint is the same bits as the same run trained in a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import local_ray_with_cache, minirotated
from ray import tune
from safetensors.torch import load_file

from raysoup.io.checkpoint import WEIGHTS_FILE, read_meta
from raysoup.results import load_results
from raysoup.sweep.plan import plan_sweep
from raysoup.sweep.runner import fit_staging, run_sweep
from raysoup.sweep.schedule import PlanSearcher

pytestmark = pytest.mark.slow

FRESH = """
import json, sys
from raysoup.options import from_mapping
from raysoup.training.trainer import RunSpec, train_run
spec = json.loads(sys.argv[1])
train_run(from_mapping(RunSpec, spec, "fresh"))
"""


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    yield from local_ray_with_cache(tmp_path_factory)


def test_one_worker_runs_every_stage_and_matches_a_fresh_process(
    local_ray, tmp_path: Path, base_checkpoint: Path
) -> None:
    config = minirotated(
        name="reuse",
        inits=["pretrained"],
        n_hparams=2,
        steps=20,
        lp_stage_steps=10,
        checkpoint_freq=10,
        max_concurrent_trials=1,  # one slot: every trial in turn, in one reused worker
    )
    plan = plan_sweep(config, tmp_path / "reuse")
    # the built-in base, already trained by the session: planted as the sweep's base run
    shutil.copytree(base_checkpoint, plan["base"][0].spec["out"])
    root = run_sweep(config, tmp_path)

    trials = load_results(root)["trials"].set_index("trial_id")
    trained = [run.key for run in plan["lp"] + plan["target"]]
    assert sorted(trials.index) == sorted(["base", *trained])
    assert (trials.status == "done").all()
    pids = trials.loc[trained, "worker_pid"]
    assert pids.nunique() == 1, pids.to_dict()  # LP and both targets: one worker process
    assert [p.name for p in (root / "tune").iterdir()] == ["sweep"]  # one experiment

    # The last trial that worker ran, trained again in a fresh process: the same bits.
    last = plan["target"][-1]
    spec = json.loads(json.dumps(last.spec, default=str))
    fresh_out = tmp_path / "fresh"
    spec["out"] = str(fresh_out)
    # with the trial's thread count (Ray gives a 1-CPU trial one thread): reductions split
    # over another number of threads round differently, reused worker or not
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(spec)], check=True, timeout=600, env=env
    )
    reused = load_file(Path(last.spec["out"]) / WEIGHTS_FILE)
    fresh = load_file(fresh_out / WEIGHTS_FILE)
    assert list(reused) == list(fresh)
    for name, tensor in reused.items():
        assert tensor.equal(fresh[name]), name
    assert read_meta(fresh_out).content_hash == read_meta(last.spec["out"]).content_hash
    assert read_meta(fresh_out).metrics["id_val_acc"] == trials.loc[last.key, "id_val_acc"]


def test_runs_that_can_start_share_the_slots(local_ray, tmp_path: Path) -> None:
    """Two slots, runs a and b ready at once: they run side by side (Tune stages one
    trial of a custom searcher at a time unless told otherwise: one at a time); c, which
    starts from a, waits for it."""

    def sleeper(config: dict) -> None:  # nested: pickled by value for the workers
        import time

        started = time.time()
        time.sleep(3)
        tune.report({"key": config["run"]["key"], "started": started, "ended": time.time()})

    searcher = PlanSearcher({key: {"key": key} for key in "abc"}, {"c": ["a"]})
    tuner = tune.Tuner(
        tune.with_resources(sleeper, {"cpu": 1}),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=3, reuse_actors=True),
        run_config=tune.RunConfig(name="slots", storage_path=str(tmp_path), verbose=0),
    )
    grid = fit_staging(tuner, 3)
    assert not grid.errors
    span = {r.metrics["key"]: (r.metrics["started"], r.metrics["ended"]) for r in grid}
    assert span["a"][0] < span["b"][1] and span["b"][0] < span["a"][1]  # side by side
    assert span["c"][0] >= span["a"][1]  # after its dependency
    assert "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ  # left as it was
