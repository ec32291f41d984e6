"""A trial that always fails does not block the sweep (issue 12, item 2)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import local_ray_with_cache, minirotated

from raysoup.cli import main
from raysoup.data.builtin import BUILTIN_AUXILIARY, BUILTIN_TARGET
from raysoup.io.checkpoint import load_checkpoint, save_checkpoint
from raysoup.models.foundation import foundation_dir
from raysoup.results import load_results
from raysoup.results.schema import validate_rows
from raysoup.soup.group import GroupKey
from raysoup.soup.posthoc import incomplete_groups
from raysoup.sweep.plan import aux_key, plan_sweep
from raysoup.sweep.runner import (
    EXIT_TRIALS_FAILED,
    Failure,
    TrialsFailedError,
    blocked_runs,
    error_summary,
    failed_row,
    run_sweep,
)
from raysoup.training.trainer import FiniteLossGuard, NonFiniteLossError, RunSpec, train_run

AUX = BUILTIN_AUXILIARY[0]

# ---------------------------------------------------------------- fast: pure pieces


def test_the_guard_names_the_first_non_finite_step_and_loss() -> None:
    guard = FiniteLossGuard()
    guard.check()  # nothing observed: fine
    for step, loss in enumerate([2.3, 1.9], start=1):
        guard.observe(step, torch.tensor(loss))
    guard.check(1e-3)  # all finite: fine
    guard.observe(3, torch.tensor(math.inf))
    guard.observe(4, torch.tensor(math.nan))
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at step 3: .*lr 0\.5"):
        guard.check(0.5)
    assert issubclass(NonFiniteLossError, FloatingPointError)


def test_a_diverging_lr_fails_the_run_naming_step_and_loss(tmp_path: Path) -> None:
    spec = RunSpec(
        dataset=BUILTIN_TARGET,
        arch="glyphcnn",
        out=tmp_path / "run",
        test_env=5,
        steps=3,
        checkpoint_freq=3,
        hparams={"lr": 1e10, "lp_steps": 0},  # every parameter, at once
        device="cpu",
    )
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2: .*lr 1e\+10"):
        train_run(spec)
    assert not (tmp_path / "run").exists()  # no checkpoint of a diverged run


def _plan(tmp_path: Path, **overrides):
    config = minirotated(
        n_hparams=2,
        inits=["pretrained", "ratatouille"],
        aux_datasets=[AUX],
        aux_n_hparams=2,
        aux_lp=True,
        **overrides,
    )
    return plan_sweep(config, tmp_path)


def _failure(key: str) -> Failure:
    return Failure("x", key, "Boom: bad", f"/f/{key}.txt")


def test_runs_that_start_from_a_failed_run_are_blocked(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    targets = plan["target"]
    auxiliary = [r for r in targets if r.spec["init"] != "pretrained"]
    # an aux run: every aux-init target (its init indexes the whole pool), no other
    blocked = blocked_runs(targets, plan, {aux_key(AUX, 1): _failure(aux_key(AUX, 1))})
    assert sorted(blocked) == sorted(r.key for r in auxiliary)
    assert set(map(tuple, blocked.values())) == {(aux_key(AUX, 1),)}
    # the target LP: every target; the aux LP: the aux runs
    lp = plan["lp"]
    target_lp = next(r.key for r in lp if r.key.endswith("-s0"))
    aux_lp = next(r.key for r in lp if r.key.endswith("-all"))
    assert sorted(blocked_runs(targets, plan, {target_lp: _failure(target_lp)})) == sorted(
        r.key for r in targets
    )
    assert sorted(blocked_runs(plan["aux"], plan, {aux_lp: _failure(aux_lp)})) == sorted(
        r.key for r in plan["aux"]
    )
    assert blocked_runs(plan["aux"], plan, {target_lp: _failure(target_lp)}) == {}
    # the base: everything after it
    later = [r for stage in ("lp", "aux", "target") for r in plan[stage]]
    assert len(blocked_runs(later, plan, {"base": _failure("base")})) == len(later)


def test_a_failed_row_fits_the_trials_schema(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    run = plan["target"][-1]
    row = failed_row("sw", run, _failure(run.key))
    table = validate_rows("trials", [row]).to_pandas()
    assert table.status[0] == "failed" and table.error[0] == "Boom: bad"
    assert table.trial_id[0] == run.key and table.init[0] == run.spec["init"]
    assert table.lr[0] > 0 and math.isnan(table.id_val_acc[0])  # no accuracy: no ingredient


def test_error_summary_takes_the_remote_cause() -> None:
    class Wrapped(RuntimeError):  # what a RayTaskError looks like: text + .cause
        cause = NonFiniteLossError("training loss is nan at step 2: ...\nmore")

    assert error_summary(Wrapped("ray::ImplicitFunc.train() (pid=1)\nTraceback ...")) == (
        "NonFiniteLossError: training loss is nan at step 2: ..."
    )
    assert error_summary(ValueError("bad\nvalue")) == "ValueError: bad"
    text = 'Failure # 3\nTraceback (most recent call last):\n  File "x"\nray.X: Boom\nKeyError: 1\n'
    assert error_summary(text) == "KeyError: 1"  # as read back from Tune's storage
    assert error_summary(RuntimeError(text)) == "KeyError: 1"
    assert "no error" in error_summary(None)


def test_incomplete_groups_are_named() -> None:
    a, b, c = (GroupKey("D", 5, 0, init) for init in ("pretrained", "ratatouille", "fusing"))
    planned = {a: ["a0", "a1"], b: ["b0", "b1"], c: ["c0"]}
    summary = [{"group": a.slug, "trials": 2}, {"group": b.slug, "trials": 1}]
    assert incomplete_groups(planned, summary) == [  # in group order
        f"no trial of {c.slug} finished: it has no soups",
        f"soups of {b.slug} use 1 of 2 planned trials",
    ]


# ---------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    yield from local_ray_with_cache(tmp_path_factory)


def _plant_aux(path: Path, *, poisoned: bool) -> None:
    """An auxiliary checkpoint of ``AUX`` (hparams seed 0): the foundation's featurizer and
    a fresh head, with consistent metadata; ``poisoned``: its featurizer is NaN, as a
    diverged (or corrupt) run's."""
    from raysoup.data.registry import dataset_class
    from raysoup.io.checkpoint import CheckpointMeta
    from raysoup.models.networks import build_network

    cls = dataset_class(AUX)
    network = build_network(
        "glyphcnn", cls.NUM_CLASSES, input_channels=cls.INPUT_SHAPE[0], imagenet=False
    )
    foundation, _ = load_checkpoint(foundation_dir())
    state = {k: v.clone() for k, v in network.state_dict().items()}
    for key in state:
        if key.startswith("featurizer."):
            value = foundation[key]
            poison = poisoned and value.is_floating_point()
            state[key] = torch.full_like(value, math.nan) if poison else value
    meta = CheckpointMeta(
        dataset=AUX,
        envs=list(cls.ENVIRONMENTS),
        arch="glyphcnn",
        num_classes=cls.NUM_CLASSES,
        stage="aux",
        test_env=-1,
        hparams={"keep": "last"},
        init={"strategy": "pretrained", "sources": ["pretrained"], "weights": [1.0]},
    )
    if path.exists():
        shutil.rmtree(path)
    save_checkpoint(path, state, meta)


def _trial_dirs(root: Path) -> list[Path]:
    """The trial folders of the sweep's Tune experiment (every driver's)."""
    return [p for p in (root / "tune" / "sweep").iterdir() if p.is_dir()]


def _mtimes(root: Path, but: str) -> dict[Path, int]:
    """The trained checkpoints (LP and target runs) other than ``but``'s."""
    return {
        p: p.stat().st_mtime_ns
        for stage in ("lp", "target")
        for p in (root / "checkpoints" / stage).rglob("model.safetensors")
        if but not in str(p)
    }


@pytest.mark.slow
def test_a_failing_trial_leaves_soups_of_the_rest_then_a_rerun_retries_it_alone(
    local_ray, tmp_path, capfd
) -> None:
    values = {
        "name": "failing",
        "arch": "glyphcnn",  # the shipped foundation: no base stage
        "steps": 3,
        "lp_stage_steps": 3,
        "checkpoint_freq": 3,
        "n_hparams": 2,
        "inits": ["pretrained", "ratatouille"],
        "aux_datasets": [AUX],
        "aux_n_hparams": 1,
        "aux_lp": False,
        "max_failures": 1,
    }
    config = minirotated(**values)
    root = tmp_path / "failing"
    aux = root / "checkpoints" / "aux" / aux_key(AUX, 0)
    # ratatouille h1 picks aux run 0 (h0 picks the pretrained featurizer): it alone fails
    _plant_aux(aux, poisoned=True)
    bad = "target-MiniRotatedMNIST-e5-s0-h1-ratatouille"

    with pytest.raises(TrialsFailedError) as caught:
        run_sweep(config, tmp_path)
    assert caught.value.root == root
    [failure] = caught.value.failures
    assert failure.key == bad and failure.error.startswith("NonFiniteLossError: training loss")
    assert "at step 1" in failure.error
    error_file = Path(failure.error_file)
    assert error_file == root / "failures" / "target" / f"{bad}.txt"
    assert "NonFiniteLossError" in error_file.read_text()
    err = capfd.readouterr().err
    assert f"{bad}: NonFiniteLossError" in err and str(error_file) in err
    assert "soups of MiniRotatedMNIST-e5-s0-ratatouille use 1 of 2 planned trials" in err

    results = load_results(root)
    trials = results["trials"]
    target = trials[trials.stage == "target"].set_index("trial_id")
    assert len(target) == 4 and target.index.is_unique
    assert target.loc[bad, "status"] == "failed" and target.loc[bad, "error"] == failure.error
    assert target.loc[bad, "error_file"] == str(error_file)
    assert (target.drop(bad).status == "done").all() and target.drop(bad).error.isna().all()
    soups = results["soups"]
    for init in ("pretrained", "ratatouille"):  # every group has its soups
        assert {"erm", "uniform", "greedy", "ensemble"} <= set(soups[soups.init == init].method)
    uniform = soups[soups.method == "uniform"].set_index("init")
    assert uniform.loc["ratatouille", "ingredients"].tolist() == [
        "target-MiniRotatedMNIST-e5-s0-h0-ratatouille"
    ]
    assert uniform.n_trials.to_dict() == {"pretrained": 2, "ratatouille": 1}
    assert uniform.n_planned.to_dict() == {"pretrained": 2, "ratatouille": 2}
    assert not soups.ingredients.apply(lambda ids: bad in list(ids)).any()

    # The same command (the CLI) again: exit code 3, the failed trial alone retried.
    yaml_file = tmp_path / "failing.yaml"
    yaml_file.write_text(yaml.safe_dump(values))
    before, first_error = _mtimes(root, bad), error_file.stat().st_mtime_ns
    n_trial_dirs = len(_trial_dirs(root))
    assert main(["run", str(yaml_file), "--storage", str(tmp_path)]) == EXIT_TRIALS_FAILED
    err = capfd.readouterr().err
    assert "stage target: 1 of 4 runs to do" in err and "stage lp: all 1 runs done" in err
    assert _mtimes(root, bad) == before  # nothing else retrained
    assert error_file.stat().st_mtime_ns > first_error  # it was tried again
    # one new trial in the sweep's experiment: the failed run's, nothing else started
    assert len(_trial_dirs(root)) == n_trial_dirs + 1
    again = load_results(root)["trials"]
    assert len(again) == len(trials) and again.trial_id.is_unique

    # The cause fixed (a sound auxiliary run): the retry succeeds and replaces the row.
    _plant_aux(aux, poisoned=False)
    assert main(["run", str(yaml_file), "--storage", str(tmp_path)]) == 0
    assert _mtimes(root, bad) == before
    results = load_results(root)
    trials = results["trials"]
    assert len(trials) == len(again) and trials.trial_id.is_unique
    assert (trials[trials.stage == "target"].status == "done").all() and trials.error.isna().all()
    uniform = results["soups"].query("method == 'uniform'").set_index("init")
    assert uniform.n_trials.to_dict() == {"pretrained": 2, "ratatouille": 2}
    assert bad in list(uniform.loc["ratatouille", "ingredients"])
