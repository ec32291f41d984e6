"""The sweep on a real local Ray instance (reduced sizes), on local and S3 storage."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pyarrow.fs as pafs
import pytest
from conftest import local_ray_with_cache, minirotated
from ray import tune

from raysoup.cli import main
from raysoup.data.builtin import BUILTIN_AUXILIARY
from raysoup.io import storage
from raysoup.io.checkpoint import is_checkpoint, load_checkpoint
from raysoup.io.layout import ENTRIES
from raysoup.options import OptionsError
from raysoup.results import load_results
from raysoup.sweep.runner import run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(s3_endpoint, tmp_path_factory):
    """One local Ray for the module, started once the S3 endpoint's environment is set
    (its workers inherit it), with its own raysoup cache."""
    yield from local_ray_with_cache(tmp_path_factory)


def test_quickstart_end_to_end_then_resume_is_a_no_op(local_ray, tmp_path, capfd) -> None:
    config = minirotated(
        steps=40,
        aux_steps=20,
        lp_stage_steps=20,
        n_hparams=2,
        checkpoint_freq=20,
        aux_n_hparams=1,
        aux_lp=False,  # the aux LP runs in test_sweep_on_s3_then_resume (saves 3 trials here)
    )
    root = run_sweep(config, tmp_path)
    named = {pattern.split("/")[0] for pattern, _ in ENTRIES}
    assert {p.name for p in root.iterdir()} <= named  # nothing outside the layout
    trials = load_results(root)["trials"]
    target = trials[trials.stage == "target"]
    assert len(target) == 2 * 3 and target.trial_id.is_unique
    assert set(target.init) == {"pretrained", "ratatouille", "fusing"}
    assert set(trials.stage) == {"base", "lp", "aux", "target"}
    assert target.id_val_acc.between(0, 1).all()
    # the folder reads with plain pandas too
    assert len(pd.read_parquet(root / "results" / "trials")) == len(trials)
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "checkpoints").rglob("model.safetensors")}
    run_sweep(config, tmp_path)  # resume of a finished sweep: nothing retrained, nothing added
    again = load_results(root)["trials"]
    assert len(again) == len(trials)
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}
    # the soup actor souped every group while the sweep ran
    results = load_results(root)
    soups, steps = results["soups"], results["soup_steps"]
    inits = ("pretrained", "ratatouille", "fusing")
    methods = ("erm", "uniform", "greedy", "uniform_all", "ensemble")
    assert sorted(zip(soups.method, soups.init, strict=True)) == sorted(
        (m, i) for m in methods for i in inits
    )
    assert (soups[soups.method == "uniform"].n_ingredients == 2).all()
    every_seed = soups.method == "uniform_all"
    assert (soups[every_seed].trial_seed == -1).all() and soups[every_seed].id_val_acc.isna().all()
    assert soups.test_acc.between(0, 1).all() and soups[~every_seed].id_val_acc.between(0, 1).all()
    for row in soups.itertuples():
        assert row.method == "ensemble" or is_checkpoint(row.checkpoint), row.checkpoint
    assert soups[soups.method == "ensemble"].checkpoint.isna().all()
    assert set(target.kept_step) <= {1, 21, 40}  # keep best, on the reference schedule
    erm = soups[soups.method == "erm"].set_index("init")
    best = target.sort_values("id_val_acc", ascending=False).groupby("init").head(1)
    assert erm.loc[best.init, "id_val_acc"].tolist() == best.id_val_acc.tolist()
    assert len(steps) == len(target) and not steps.duplicated(["trial_id"]).any()
    assert len(pd.read_parquet(root / "results" / "soups")) == len(soups)
    # post-hoc: the same soups again from the checkpoints, then with ">" acceptance
    before = soups.sort_values(["method", "init"]).reset_index(drop=True)
    # `raysoup soup` in a fresh interpreter: it never imports Ray
    code = (
        "import sys; from raysoup.cli import main; rc = main(['soup', sys.argv[1]]); "
        "assert 'ray' not in sys.modules, 'raysoup soup imported ray'; sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    after = load_results(root)["soups"].sort_values(["method", "init"]).reset_index(drop=True)
    columns = ["method", "init", "n_ingredients", "id_val_acc", "test_acc"]
    pd.testing.assert_frame_equal(before[columns], after[columns])
    assert main(["soup", str(root), "--method", "greedy", "--accept", "gt"]) == 0
    gt = load_results(root)["soups"]
    assert len(gt) == len(soups) and set(gt[gt.method == "greedy"].accept) == {"gt"}
    assert main(["soup", str(tmp_path / "nowhere")]) == 2
    assert main(["results", str(root), "--format", "markdown", "--plot", str(tmp_path)]) == 0
    assert (tmp_path / "methods.png").stat().st_size > 0
    assert (tmp_path / "soup_progress.png").stat().st_size > 0
    assert (tmp_path / "id_vs_ood.svg").stat().st_size > 0
    _diagnose_and_report(root, tmp_path, capfd)
    with pytest.raises(OptionsError, match="different config"):
        run_sweep(minirotated(steps=41, aux_steps=20, lp_stage_steps=20), tmp_path)


def _diagnose_and_report(root, tmp_path, capfd) -> None:
    """``raysoup diagnose`` and ``raysoup report`` on the finished sweep (2 trials a group)."""
    assert main(["diagnose", str(root), "--points", "3", "--landscape", "--grid", "3"]) == 0
    results = load_results(root)
    diag, trials, soups = results["diagnostics"], results["trials"], results["soups"]
    trials = trials.set_index("trial_id")
    assert set(diag.diagnostic) == {
        "init_to_trial",
        "trial_to_trial",
        "soup_to_ingredient",
        "angle",
        "landscape",
    }
    pairs = diag[diag.diagnostic == "trial_to_trial"]
    assert len(pairs) == 3 * 3  # one pair per group (2 trials each), 3 points
    for row in pairs.itertuples():
        if row.a in (0.0, 1.0):  # the ends are the trials themselves, exactly
            trial = trials.loc[row.start if row.a == 0.0 else row.end]
            assert (row.id_val_acc, row.test_acc) == (trial.id_val_acc, trial.test_acc)
        else:  # the midpoint is the group's two-ingredient uniform soup, exactly
            uniform = soups[(soups.method == "uniform") & (soups.init == row.init)].iloc[0]
            assert trials.loc[row.start].id_val_acc >= trials.loc[row.end].id_val_acc
            assert (row.id_val_acc, row.test_acc) == (uniform.id_val_acc, uniform.test_acc)
    ends = diag[(diag.diagnostic == "init_to_trial") & (diag.a == 1.0)]
    assert (
        len(ends) == 6 and (ends.id_val_acc.values == trials.loc[ends.end].id_val_acc.values).all()
    )
    angles = diag[diag.diagnostic == "angle"]
    assert len(angles) == 3 and angles.angle_deg.between(0, 180).all()
    parts = sorted((root / "results" / "diagnostics").glob("part-*.parquet"))
    assert len(parts) == 3 * 5
    mtimes = [p.stat().st_mtime_ns for p in parts]
    capfd.readouterr()
    assert main(["diagnose", str(root), "--points", "3", "--landscape", "--grid", "3"]) == 0
    assert capfd.readouterr().err.count("up to date") == 15  # nothing recomputed
    assert [p.stat().st_mtime_ns for p in parts] == mtimes
    assert len(load_results(root)["diagnostics"]) == len(diag)
    out = tmp_path / "report.html"
    assert main(["report", str(root), "-o", str(out)]) == 0
    page = out.read_text()
    # every figure is an inline PNG; methods, diagnostics summary and trials are tables
    images = page.count('src="data:image/png;base64,')
    assert images == 3 + 1 + 2 * 3  # methods, id_vs_ood, progress; angles; per group: 2
    assert page.count("<table") == 3 and "http" not in page.replace("http://www.w3.org", "")
    assert main(["diagnose", str(root), "--group", "nope"]) == 2


def _files(location: storage.Location) -> dict[str, object]:
    """Every file under ``location`` (relative path -> modification time)."""
    fs, path = storage.filesystem(location)
    selector = pafs.FileSelector(path, recursive=True)
    return {
        info.path[len(path) + 1 :]: info.mtime
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
    }


def test_sweep_on_s3_then_resume(local_ray, s3_bucket, capfd) -> None:
    aux = BUILTIN_AUXILIARY[0]
    config = minirotated(
        name="s3sweep",
        steps=20,
        aux_steps=20,
        lp_stage_steps=20,
        checkpoint_freq=20,
        n_hparams=1,
        inits=["pretrained", "fusing"],  # fusing fetches the aux run from the bucket
        aux_datasets=[aux],
        aux_n_hparams=1,
    )
    root = run_sweep(config, storage=f"{s3_bucket}/runs")
    assert root == f"{s3_bucket}/runs/s3sweep"
    trials = load_results(root)["trials"]
    assert trials.trial_id.is_unique
    assert trials.groupby("stage").size().to_dict() == {"aux": 1, "base": 1, "lp": 2, "target": 2}
    aux_run = trials[trials.stage == "aux"].iloc[0]  # started from its LP head, in the bucket
    assert storage.read_meta(aux_run.checkpoint).hparams["keep"] == "last"
    assert f"{root}/checkpoints/lp/lp-{aux}-all" in set(trials.checkpoint)
    assert trials.checkpoint.str.startswith(f"{root}/checkpoints/").all()
    soup_folder = f"{root}/checkpoints/soup/"
    found = storage.find_checkpoints(f"{root}/checkpoints")
    assert sorted(c for c in found if not c.startswith(soup_folder)) == sorted(trials.checkpoint)
    fusing = trials[trials.init == "fusing"].iloc[0]
    assert list(fusing.init_sources) == ["pretrained", f"{root}/checkpoints/aux/aux-{aux}-h0"]
    _, meta = load_checkpoint(storage.local_checkpoint(fusing.checkpoint))
    assert meta.content_hash == fusing.content_hash
    assert meta.init["pretrained_from"] == f"{root}/checkpoints/base/base"
    files = _files(root)
    assert "sweep.json" in files
    temporary = [f for f in files if any(part.startswith(".") for part in f.split("/"))]
    assert [f for f in temporary if not f.startswith("tune/")] == []
    fs, tune_path = storage.filesystem(f"{root}/tune")
    # Tune's experiment state (every run's trial) reached the bucket too
    assert tune.Tuner.can_restore(f"{tune_path}/sweep", storage_filesystem=fs)
    soups = load_results(root)["soups"]  # the soup actor read and wrote the bucket too
    group_methods = ["erm", "uniform", "greedy", "ensemble"]
    assert sorted(soups.method) == sorted([*group_methods, "uniform_all"] * 2)
    for method in ("uniform", "greedy"):
        assert f"checkpoints/soup/{method}/MiniRotatedMNIST-e5-s0-fusing/raysoup.json" in files
    assert "checkpoints/soup/uniform_all/MiniRotatedMNIST-e5-sall-fusing/raysoup.json" in files
    assert "soup_state.json" in files
    for checkpoint in soups.checkpoint.dropna():
        assert storage.is_checkpoint(checkpoint) and checkpoint.startswith(root)
    first = capfd.readouterr().err  # raysoup's status lines, not Tune's table (tune_verbose 0)
    final = "raysoup: 6/6 runs done (base 1/1, lp 2/2, aux 1/1, target 2/2), 0 running, 0 failed"
    assert final in first and "Trial status" not in first

    assert run_sweep(config, storage=f"{s3_bucket}/runs/") == root  # resume: nothing to do
    err = capfd.readouterr().err
    for stage, n in [("base", 1), ("lp", 2), ("aux", 1), ("target", 2)]:
        assert f"stage {stage}: all {n} runs done, skipped" in err
    again = load_results(root)["trials"]
    assert len(again) == len(trials) and again.trial_id.is_unique
    checkpoints = {f: t for f, t in files.items() if f.startswith("checkpoints/")}
    assert {f: t for f, t in _files(root).items() if f.startswith("checkpoints/")} == checkpoints
