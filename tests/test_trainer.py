"""The single-run trainer on the built-in benchmark, through every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raysoup.data.builtin import BUILTIN_TARGET
from raysoup.io.checkpoint import CheckpointError, load_checkpoint, read_meta
from raysoup.options import OptionsError
from raysoup.training.trainer import KeepBest, RunSpec, is_eval_step, lp_head_problem, train_run

TEST_ENV = 5  # rotated by 75 degrees: the hardest, the furthest from the others


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, base_checkpoint: Path) -> dict:
    """base (cached) -> LP -> two auxiliary runs: what target runs start from."""
    root = tmp_path_factory.mktemp("pipeline")
    common = {"pretrained": base_checkpoint, "device": "cpu"}
    lp = train_run(
        RunSpec(
            dataset=BUILTIN_TARGET,
            out=root / "lp",
            stage="lp",
            test_env=TEST_ENV,
            steps=150,
            **common,
        )
    )
    for name in ("AuxRotationFlip", "AuxRecolourMod5"):
        train_run(
            RunSpec(
                dataset=name, out=root / "aux" / name, stage="aux", test_env=-1, steps=60, **common
            )
        )
    return {"root": root, "lp": lp, "common": common}


def _target(pipeline: dict, out: Path, **kw) -> dict:
    values = {
        "dataset": BUILTIN_TARGET,
        "out": out,
        "test_env": TEST_ENV,
        "lp_head": pipeline["root"] / "lp",
        "aux_dir": [pipeline["root"] / "aux"],
        "steps": 200,
        "checkpoint_freq": 100,
        **pipeline["common"],
        **kw,
    }
    spec = RunSpec(**values)
    return train_run(spec)


def test_lp_trains_the_head_only(pipeline: dict, base_checkpoint: Path) -> None:
    lp_state, lp_meta = load_checkpoint(pipeline["root"] / "lp")
    base_state, _ = load_checkpoint(base_checkpoint)
    for key, value in lp_state.items():
        if key.startswith("featurizer."):
            assert torch.equal(value, base_state[key]), key  # frozen, BatchNorm stats included
    assert lp_meta.stage == "lp" and lp_meta.test_env == TEST_ENV
    assert pipeline["lp"]["id_val_acc"] > 0.2  # well above the 0.1 of chance


def test_target_run_learns_and_ood_is_harder(pipeline: dict, tmp_path: Path) -> None:
    result = _target(pipeline, tmp_path / "t")
    assert result["id_val_acc"] > 0.6, result  # chance is 0.1
    assert result["test_acc"] < result["id_val_acc"] - 0.05
    for i in range(6):
        assert 0 <= result[f"env{i}_in_acc"] <= 1 and 0 <= result[f"env{i}_out_acc"] <= 1
    meta = read_meta(tmp_path / "t")
    assert (
        meta.init["strategy"] == "pretrained" and meta.metrics["id_val_acc"] == result["id_val_acc"]
    )


def test_same_spec_same_checkpoint_on_cpu(pipeline: dict, tmp_path: Path) -> None:
    a = _target(pipeline, tmp_path / "a", steps=60, hparams_seed=2)
    b = _target(pipeline, tmp_path / "b", steps=60, hparams_seed=2)
    assert a["content_hash"] == b["content_hash"]
    c = _target(pipeline, tmp_path / "c", steps=60, hparams_seed=2, trial_seed=1, lp_head=None)
    assert c["content_hash"] != a["content_hash"]


def test_ratatouille_and_fusing_inits(pipeline: dict, tmp_path: Path) -> None:
    aux = pipeline["root"] / "aux"
    rat = _target(pipeline, tmp_path / "r", init="ratatouille", hparams_seed=1, steps=60)
    # k = 1 % 3 = 1 -> first aux dataset by name, run 1 % 1 = 0
    assert rat["init_sources"] == [str(aux / "AuxRecolourMod5")]
    fus = _target(
        pipeline, tmp_path / "f", init="fusing", hparams_seed=1, steps=60, fusing_range=4.0
    )
    assert fus["init_sources"] == [
        "pretrained",
        str(aux / "AuxRecolourMod5"),
        str(aux / "AuxRotationFlip"),
    ]
    assert np.isclose(sum(fus["init_weights"]), 1.0) and len(set(fus["init_weights"])) == 3
    assert read_meta(tmp_path / "f").init["weights"] == fus["init_weights"]
    uniform = _target(
        pipeline, tmp_path / "u", init="fusing", hparams_seed=1, steps=1, fusing_range=0.0
    )
    assert np.allclose(uniform["init_weights"], 1 / 3)


def test_leakage_guard_in_the_trainer(pipeline: dict, tmp_path: Path) -> None:
    leak = tmp_path / "pool"
    train_run(
        RunSpec(
            dataset=BUILTIN_TARGET,
            out=leak / "target_aux",
            stage="aux",
            test_env=-1,
            steps=5,
            **pipeline["common"],
        )
    )
    spec = RunSpec(
        dataset=BUILTIN_TARGET,
        out=tmp_path / "x",
        test_env=TEST_ENV,
        init="ratatouille",
        aux_dir=[leak],
        steps=5,
        **pipeline["common"],
    )
    with (
        pytest.warns(UserWarning, match="leakage guard"),
        pytest.raises(CheckpointError, match="no usable auxiliary"),
    ):
        train_run(spec)


def test_lp_head_check_shared_and_per_trial_seed() -> None:
    run = (BUILTIN_TARGET, 5, 2)
    assert lp_head_problem(run, (BUILTIN_TARGET, 5, 2), per_trial_seed=True) is None
    assert lp_head_problem(run, (BUILTIN_TARGET, 5, 0), per_trial_seed=False) is None  # shared
    assert "own trial seed" in lp_head_problem(run, (BUILTIN_TARGET, 5, 0), per_trial_seed=True)
    assert "shared one" in lp_head_problem(run, (BUILTIN_TARGET, 5, 1), per_trial_seed=False)
    for head in [(BUILTIN_TARGET, 4, 2), (BUILTIN_TARGET, 4, 0), ("AuxRotationFlip", 5, 2)]:
        for per_trial_seed in (False, True):
            assert "held-out" in lp_head_problem(run, head, per_trial_seed=per_trial_seed)


def test_the_shared_lp_head_starts_every_trial_seed_but_no_other_test_env(
    pipeline: dict, tmp_path: Path
) -> None:
    shared = _target(pipeline, tmp_path / "s3", trial_seed=3, steps=1)  # head: trial seed 0
    lp_state, _ = load_checkpoint(pipeline["root"] / "lp")
    state, meta = load_checkpoint(tmp_path / "s3")
    assert meta.trial_seed == 3
    for key, value in lp_state.items():  # one Adam step (lr 1e-3) away from the LP head
        if key.startswith("classifier."):
            assert (state[key] - value).abs().max() <= 1.01e-3, key
    with pytest.raises(CheckpointError, match=r"LP head was trained for.*own trial seed"):
        _target(pipeline, tmp_path / "x", trial_seed=3, steps=1, lp_per_trial_seed=True)
    for per_trial_seed in (False, True):
        with pytest.raises(CheckpointError, match=r"another dataset or test env"):
            _target(pipeline, tmp_path / "y", test_env=4, steps=1, lp_per_trial_seed=per_trial_seed)
    assert shared["trial_seed"] == 3 and not (tmp_path / "x").exists()


def test_evaluation_schedules() -> None:
    def evals(steps: int, freq: int, schedule: str) -> list[int]:
        return [d for d in range(1, steps + 1) if is_eval_step(d, steps, freq, schedule)]

    # DomainBed: step % CHECKPOINT_FREQ == 0 (0-based) or step == n_steps - 1
    assert evals(5001, 100, "reference")[:3] == [1, 101, 201]
    assert evals(5001, 100, "reference")[-2:] == [4901, 5001]
    assert evals(250, 100, "reference") == [1, 101, 201, 250]
    assert evals(250, 100, "multiples") == [100, 200, 250]
    assert evals(1, 100, "reference") == evals(1, 100, "multiples") == [1]
    with pytest.raises(ValueError, match="eval_schedule='often'"):
        is_eval_step(1, 10, 5, "often")


def test_keep_best_keeps_the_first_maximum_strictly() -> None:
    keeper = KeepBest()
    for step, score in enumerate([0.5, float("nan"), 0.7, 0.7, 0.6], start=1):
        keeper.offer(score, {"step": step}, lambda step=step: {"w": torch.tensor(step)})
    assert keeper.metrics == {"step": 3} and int(keeper.state["w"]) == 3
    assert not keeper.offer(0.7, {}, lambda: pytest.fail("a tie must not copy the state"))


def test_keep_best_and_keep_last_checkpoints_hold_their_evaluation(
    pipeline: dict, tmp_path: Path
) -> None:
    """Both follow one trajectory; each saves one evaluation, with that evaluation's metrics
    (the re-evaluated checkpoint scores exactly them)."""
    from raysoup.soup.evaluator import DataKey, GroupData, SoupEvaluator

    kw = {"steps": 21, "checkpoint_freq": 10, "hparams_seed": 1}
    best = _target(pipeline, tmp_path / "best", **kw)  # keep="best": the target default
    last = _target(pipeline, tmp_path / "last", keep="last", **kw)
    history = [{k: v for k, v in h.items() if k != "wall_s"} for h in best["history"]]
    assert history == [{k: v for k, v in h.items() if k != "wall_s"} for h in last["history"]]
    assert [h["step"] for h in history] == [1, 11, 21]  # the reference schedule
    scores = [h["id_val_acc"] for h in history]
    kept = {"best": history[scores.index(max(scores))], "last": history[-1]}
    data = GroupData(DataKey(BUILTIN_TARGET, TEST_ENV, 0), None, 0.2)
    for name in ("best", "last"):
        state, meta = load_checkpoint(tmp_path / name)
        assert meta.metrics["step"] == kept[name]["step"] and meta.hparams["keep"] == name
        for key in ("id_val_acc", "test_acc", "env0_out_acc", "loss"):
            assert meta.metrics[key] == kept[name][key], (name, key)
        evaluator = SoupEvaluator(data, meta, torch.device("cpu"))
        assert evaluator.id_val_acc(state) == meta.metrics["id_val_acc"]
        assert evaluator.test_acc(state) == meta.metrics["test_acc"]
    same = kept["best"]["step"] == 21
    assert (best["content_hash"] == last["content_hash"]) == same


def test_an_aux_run_from_its_lp_head_trains_every_parameter_from_the_first_step(
    pipeline: dict, base_checkpoint: Path, tmp_path: Path
) -> None:
    """The reference's aux runs: the dataset's LP head, no head-only phase (no aux
    featurizer is loaded, so ``_need_lp()`` is false); without a head, one comes first."""
    common = {"dataset": "AuxRotationFlip", "test_env": -1, **pipeline["common"]}
    train_run(RunSpec(out=tmp_path / "lp", stage="lp", steps=20, checkpoint_freq=10, **common))
    lp_state, lp_meta = load_checkpoint(tmp_path / "lp")
    assert lp_meta.test_env == -1 and lp_meta.trial_seed == 0
    train_run(RunSpec(out=tmp_path / "a", stage="aux", steps=1, lp_head=tmp_path / "lp", **common))
    train_run(RunSpec(out=tmp_path / "b", stage="aux", steps=1, **common))
    base_state, _ = load_checkpoint(base_checkpoint)
    from_head, _ = load_checkpoint(tmp_path / "a")
    head_first, _ = load_checkpoint(tmp_path / "b")
    featurizer = [k for k in base_state if k.startswith("featurizer.") and "weight" in k]
    assert all(torch.equal(head_first[k], base_state[k]) for k in featurizer)  # head-only
    assert not any(torch.equal(from_head[k], base_state[k]) for k in featurizer)
    for key in (k for k in lp_state if k.startswith("classifier.")):
        assert (from_head[key] - lp_state[key]).abs().max() <= 1.01e-3, key


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset": "Nope"}, "unknown dataset 'Nope'"),
        ({"test_env": 6}, "test_env=6 is out of range"),
        ({"init": "fusing"}, "needs auxiliary checkpoints"),
        ({"steps": 0}, "steps=0"),
        ({"stage": "aux"}, "use test_env=-1"),
        ({"fusing_range": -1.0}, "fusing_range=-1.0"),
        ({"holdout_fraction": 1.0}, "holdout_fraction=1.0"),
        ({"lp_head": "/nonexistent"}, "not a checkpoint directory"),
    ],
)
def test_bad_specs_are_rejected_before_any_work(
    tmp_path: Path, changes: dict, message: str
) -> None:
    values = {"dataset": BUILTIN_TARGET, "out": tmp_path / "o", "test_env": 0, **changes}
    with pytest.raises((OptionsError, ValueError), match=message):
        RunSpec(**values).validate()
    assert not (tmp_path / "o").exists()


def test_cli_train_prints_one_json_object(base_checkpoint: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "raysoup.cli",
        "train",
        "--dataset",
        BUILTIN_TARGET,
        "--test-env",
        "0",
        "--trial-seed",
        "0",
        "--hparams-seed",
        "0",
        "--init",
        "pretrained",
        "--steps",
        "40",
        "--pretrained",
        str(base_checkpoint),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout)
    for key in ("id_val_acc", "test_acc", "env0_in_acc", "env5_out_acc", "checkpoint"):
        assert key in result
    assert "step     40" in done.stderr  # progress lines go to stderr
    bad = subprocess.run([*cmd[:5], "Nope", *cmd[6:]], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown dataset 'Nope'" in bad.stderr


def test_domainbed_imagefolder_run_with_resnet(tmp_path: Path) -> None:
    """The on-disk path end to end: PACS layout, ResNet-18, explicit ImageNet weights file."""
    import torchvision
    from PIL import Image

    from raysoup.data.domainbed import PACS

    for e, env in enumerate(PACS.ENV_FOLDERS):
        for c in range(7):
            folder = tmp_path / "data" / "PACS" / env / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (40, 30), (30 * c, 60 * e, 10 * i)).save(folder / f"{i}.jpg")
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    result = train_run(
        RunSpec(
            dataset="PACS",
            data_dir=tmp_path / "data",
            out=tmp_path / "ck",
            test_env=3,
            arch="resnet18",
            pretrained_weights=weights,
            steps=2,
            hparams={"batch_size": 2},
            device="cpu",
        )
    )
    assert result["stage"] == "target" and 0 <= result["test_acc"] <= 1
    meta = read_meta(tmp_path / "ck")
    assert meta.arch == "resnet18" and meta.envs == ["A", "C", "P", "S"] and meta.num_classes == 7
    assert meta.init["pretrained_from"] == str(weights)


def test_arch_resolution_follows_the_resnet18_hparam(tmp_path: Path) -> None:
    """The network built and the arch recorded in the checkpoint come from one place."""
    from raysoup.data.domainbed import PACS
    from raysoup.training.trainer import resolve_arch

    spec = RunSpec(dataset="PACS", out=tmp_path / "o", data_dir=tmp_path)
    assert resolve_arch(spec, PACS, {"resnet18": False}) == "resnet50"
    assert resolve_arch(spec, PACS, {"resnet18": True}) == "resnet18"
    spec.arch = "cnn"
    assert resolve_arch(spec, PACS, {"resnet18": True}) == "cnn"


def test_a_sweep_base_run_copies_the_base_cached_with_the_same_bits(
    base_checkpoint: Path, sweep_cache: Path, tmp_path: Path
) -> None:
    """The cache entry is keyed by recipe, device and (CPU) thread count: a base run
    trained with another count would give other bits, so it is not copied. (The session's
    base was trained with one thread, as a sweep's one-CPU base trial trains it.)"""
    from conftest import torch_threads

    from raysoup.training.trainer import adopt_cached_base, base_spec, cache_base

    spec = base_spec(tmp_path / "base", "cpu")
    spec.cache_dir = sweep_cache
    with torch_threads(1):
        assert adopt_cached_base(spec) == base_checkpoint
    assert read_meta(spec.out).content_hash == read_meta(base_checkpoint).content_hash
    other_recipe = base_spec(tmp_path / "short", "cpu")
    other_recipe.cache_dir, other_recipe.steps = sweep_cache, 10
    with torch_threads(1):
        assert adopt_cached_base(other_recipe) is None and not other_recipe.out.exists()
    with torch_threads(2):
        spec.out = tmp_path / "two-threads"
        assert adopt_cached_base(spec) is None  # another thread count: not the same bits
        spec.cache_dir, spec.out = tmp_path / "cache", tmp_path / "base"
        cache_base(spec)  # what a sweep does after training its base here
        spec.out = tmp_path / "again"
        assert adopt_cached_base(spec) is not None
        assert read_meta(spec.out).content_hash == read_meta(base_checkpoint).content_hash
