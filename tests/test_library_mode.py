"""Library mode: ``experiments/soup_my_tune_script.py`` (a plain Tune script plus a few
raysoup lines) soups as it sweeps, and its soups equal post-hoc souping of the same
checkpoints (same ingredients, same weights)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from raysoup.results import load_results
from raysoup.tune import SoupCallback, soup_tune_experiment

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "soup_my_tune_script.py"
pytestmark = pytest.mark.slow


def _script_module():
    spec = importlib.util.spec_from_file_location("soup_my_tune_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_script_soups_as_it_sweeps_and_equals_post_hoc(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    arch = "timm:test_resnet"  # small: the machinery is under test
    command = [
        sys.executable,
        str(SCRIPT),
        "--storage",
        str(tmp_path),
        "--name",
        "lib",
        "--samples",
        "5",
        "--epochs",
        "1",
        "--arch",
        arch,
        "--num-cpus",
        "2",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "greedy" in done.stdout and "uniform" in done.stdout

    live = load_results(tmp_path / "lib")
    assert len(live["trials"]) == 5 and (live["trials"].status == "done").all()
    soups = live["soups"].set_index("method")
    assert set(soups.index) == {"erm", "uniform", "greedy"}
    assert soups.loc["uniform", "n_ingredients"] == 5
    steps = live["soup_steps"]
    assert sorted(steps["rank"]) == list(range(5))  # every trial decided once, in rank order

    module = _script_module()
    posthoc = soup_tune_experiment(
        tmp_path / "tune" / "lib",
        storage=tmp_path / "posthoc",
        name="lib",
        metric="val_acc",
        state_dict_file=module.STATE_DICT_FILE,
        evaluate=module.evaluator(arch, "val"),
        evaluate_test=module.evaluator(arch, "test"),
    )
    after = pd.DataFrame(posthoc).set_index("method")
    for method in ("erm", "uniform", "greedy"):
        assert list(after.loc[method, "ingredients"]) == list(soups.loc[method, "ingredients"])
        assert after.loc[method, "id_val_acc"] == soups.loc[method, "id_val_acc"]
        assert after.loc[method, "test_acc"] == soups.loc[method, "test_acc"]
    for method in ("uniform", "greedy"):
        streamed = load_file(Path(soups.loc[method, "checkpoint"]) / "model.safetensors")
        again = load_file(Path(after.loc[method, "checkpoint"]) / "model.safetensors")
        assert list(streamed) == list(again)
        for key, tensor in streamed.items():
            assert tensor.equal(again[key]), (method, key)


def test_bad_callback_options_are_refused_before_the_sweep(tmp_path: Path) -> None:
    ok = {
        "storage": tmp_path,
        "name": "x",
        "metric": "acc",
        "state_dict_file": "m.pt",
        "evaluate": lambda state: 0.5,
    }
    with pytest.raises(ValueError, match="accept='best'"):
        SoupCallback(**ok, accept="best")
    with pytest.raises(ValueError, match=r"state_dict_file='a/m\.pt'"):
        SoupCallback(**{**ok, "state_dict_file": "a/m.pt"})
    with pytest.raises(ValueError, match="evaluate=3"):
        SoupCallback(**{**ok, "evaluate": 3})
    with pytest.raises(ValueError, match="name='a/b'"):
        SoupCallback(**{**ok, "name": "a/b"})


def test_a_trial_whose_last_report_lacks_its_checkpoint_is_named(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from raysoup.tune import TrialCheckpoint

    def trial(result: dict, checkpoint: str | None = "checkpoint_000002"):
        where = None if checkpoint is None else SimpleNamespace(path=str(tmp_path / checkpoint))
        return SimpleNamespace(trial_id="t1", last_result=result, checkpoint=where, config={})

    good = {"val_acc": 0.5, "checkpoint_dir_name": "checkpoint_000002"}
    assert TrialCheckpoint.from_trial(trial(good), "val_acc", None, "g").id_val_acc == 0.5
    grouped = TrialCheckpoint.from_trial(trial(good), "val_acc", lambda c: "lr-1", "g")
    assert grouped.group == "lr-1"
    with pytest.raises(ValueError, match="t1: reported no checkpoint"):
        TrialCheckpoint.from_trial(trial(good, None), "val_acc", None, "g")
    with pytest.raises(ValueError, match="last report carries no checkpoint"):
        TrialCheckpoint.from_trial(trial({"val_acc": 0.5}), "val_acc", None, "g")
    with pytest.raises(ValueError, match="metric 'acc' is not in its last report"):
        TrialCheckpoint.from_trial(trial(good), "acc", None, "g")
    with pytest.raises(ValueError, match=r"val_acc=93\.0; .* fraction in \[0, 1\]"):
        TrialCheckpoint.from_trial(trial({**good, "val_acc": 93.0}), "val_acc", None, "g")


def test_post_hoc_souping_checks_the_same_options_first(tmp_path: Path) -> None:
    ok = {
        "storage": tmp_path,
        "name": "x",
        "metric": "acc",
        "state_dict_file": "m.pt",
        "evaluate": lambda state: 0.5,
    }
    missing = tmp_path / "no-such-experiment"  # refused on the options, before it is read
    with pytest.raises(ValueError, match="accept='best'"):
        soup_tune_experiment(missing, **ok, accept="best")
    with pytest.raises(ValueError, match=r"state_dict_file='a/m\.pt'"):
        soup_tune_experiment(missing, **{**ok, "state_dict_file": "a/m.pt"})
