from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import minirotated

from raysoup.io.checkpoint import CheckpointMeta, save_checkpoint
from raysoup.options import OptionsError
from raysoup.sweep.config import SweepConfig, load_config
from raysoup.sweep.plan import checkpoint_path, plan_sweep
from raysoup.sweep.record import read_config, record_config
from raysoup.training.trainer import RunSpec


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "test_envs: [6]\n",
            r"test_envs: 6 is out of range for MiniRotatedMNIST .*expected 0\.\.5",
        ),
        ("aux_datasets: [AuxRotationFlip, MiniRotatedMNIST]\n", "contains the target dataset"),
        ("n_hparams: 0\n", "n_hparams=0"),
        ("test_envs: []\n", "test_envs is empty"),
        ("inits: []\n", "inits is empty"),
        ("inits: [pretrained, soup]\n", "unknown init 'soup'"),
        ("learning_rate: 0.1\n", r"unknown option\(s\) \['learning_rate'\]"),
        ("n_hparams: three\n", "'n_hparams'='three': expected an integer"),
        ("trial_seeds: 0\n", "expected a list"),
        ("dataset: PACS\ntest_envs: [0]\ninits: [pretrained]\n", "read from disk: set data_dir"),
        ("aux_datasets: []\n", "need auxiliary checkpoints: set aux_datasets or aux_dirs"),
        ("gpus_per_trial: -1\n", "gpus_per_trial=-1"),
        ("soup_accept: gte\n", r"expected one of \['ge', 'gt'\]"),
        ("[1, 2]\n", "mapping of options"),
        ("hparams: {lr: big}\n", r"hparams: lr='big': expected a number"),
        ("hparams: {batch_size: 0}\n", r"batch_size=0: expected a positive integer"),
        ("hparams: {momentum: 0.9}\n", r"unknown hyperparameter\(s\) \['momentum'\]"),
        ("dataset: null\naux_datasets: []\n", "auxiliary pool only.*aux_datasets is empty"),
        ("dataset: null\naux_datasets: [PACS]\n", "'PACS' is read from disk: set data_dir"),
        (
            "dataset: PACS\ndata_dir: /d\ntest_envs: [0]\naux_datasets: [AuxRotationFlip]\n",
            "'AuxRotationFlip' trains a cnn but target 'PACS' a resnet50",
        ),
        ("aux_pool: /no/such/pool\n", "aux_pool='/no/such/pool': no such directory"),
        ("test_envs: [1\n", "not valid YAML"),
        ("target_keep: first\n", r"'target_keep'='first': expected one of \['last', 'best'\]"),
        ("eval_schedule: often\n", r"'eval_schedule'='often': expected one of \['reference'"),
        ("aux_lp: maybe\n", r"'aux_lp'='maybe': expected true or false"),
        ("lp_per_trial_seed: 1\n", r"'lp_per_trial_seed'=1: expected true or false"),
        ("soup_every_s: -1\n", r"soup_every_s=-1.0: expected seconds >= 0"),
        ("soup_every_s: .nan\n", r"soup_every_s=nan: expected seconds >= 0"),
    ],
)
def test_bad_configs_are_rejected_with_a_clear_message(tmp_path, yaml_text, message) -> None:
    with pytest.raises(OptionsError, match=message):
        load_config(_write(tmp_path, yaml_text))


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(OptionsError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_fingerprint_changes_with_what_is_computed(tmp_path) -> None:
    a = minirotated()
    assert a.fingerprint() == minirotated().fingerprint()
    assert a.fingerprint() == minirotated(max_concurrent_trials=2).fingerprint()
    assert a.fingerprint() == minirotated(reuse_workers=False).fingerprint()
    assert a.fingerprint() != minirotated(n_hparams=4).fingerprint()
    for switch in ({"target_keep": "last"}, {"aux_lp": False}, {"lp_per_trial_seed": True}):
        assert a.fingerprint() != minirotated(**switch).fingerprint(), switch
    assert a.fingerprint() != minirotated(eval_schedule="multiples").fingerprint()
    assert (
        load_config(_write(tmp_path, "n_hparams: 4\naux_n_hparams: 1\n")).fingerprint()
        == minirotated(n_hparams=4).fingerprint()
    )


def test_plan_covers_every_stage_with_stable_keys(tmp_path) -> None:
    config = minirotated(n_hparams=2, trial_seeds=[0, 1], test_envs=[0, 5])
    plan = plan_sweep(config, tmp_path)
    assert list(plan) == ["base", "lp", "aux", "target"]
    assert len(plan["aux"]) == 3 * 1  # the quickstart's aux_n_hparams (a config file: 4)
    assert SweepConfig().aux_n_hparams == 4  # as ModelRatatouille's README
    assert len(plan["target"]) == 2 * 2 * 2 * 3
    keys = [r.key for runs in plan.values() for r in runs]
    assert len(keys) == len(set(keys))
    assert plan == plan_sweep(config, tmp_path)
    for runs in plan.values():
        for run in runs:
            RunSpec(**run.spec)  # every planned spec is a valid RunSpec
    # The reference: one LP per (dataset, test env) on trial seed 0, shared by every seed
    # (the ID-val split of seeds >= 1 overlaps its training split), one per aux dataset.
    lp = {run.key: run.spec for run in plan["lp"]}
    aux_lps = [f"lp-{aux}-all" for aux in config.aux_datasets]
    assert list(lp) == ["lp-MiniRotatedMNIST-e0-s0", "lp-MiniRotatedMNIST-e5-s0", *aux_lps]
    assert {spec["trial_seed"] for spec in lp.values()} == {0}
    assert all(lp[key]["test_env"] == -1 and lp[key]["hparams"] == {} for key in aux_lps)
    target = plan["target"][-1].spec
    assert target["trial_seed"] == 1 and not target["lp_per_trial_seed"]
    assert target["lp_head"] == tmp_path / "checkpoints/lp/lp-MiniRotatedMNIST-e5-s0"
    assert target["keep"] == "best" and target["eval_schedule"] == "reference"
    for run in plan["aux"]:  # every aux run starts from its dataset's LP head
        assert run.spec["lp_head"] == tmp_path / f"checkpoints/lp/lp-{run.spec['dataset']}-all"
        assert run.spec.get("keep") is None  # aux runs keep their last step
    # the switches back
    per_seed = plan_sweep(
        minirotated(
            n_hparams=2,
            trial_seeds=[0, 1],
            test_envs=[0, 5],
            lp_per_trial_seed=True,
            aux_lp=False,
            target_keep="last",
        ),
        tmp_path,
    )
    assert [run.key for run in per_seed["lp"]] == [
        f"lp-MiniRotatedMNIST-e{e}-s{s}" for e in (0, 5) for s in (0, 1)
    ]
    target = per_seed["target"][-1].spec
    assert target["lp_head"] == tmp_path / "checkpoints/lp/lp-MiniRotatedMNIST-e5-s1"
    assert target["lp_per_trial_seed"] and target["keep"] == "last"
    assert all(run.spec["lp_head"] is None for run in per_seed["aux"])
    pretrained_only = plan_sweep(minirotated(inits=["pretrained"]), tmp_path)
    assert "aux" not in pretrained_only and len(pretrained_only["lp"]) == 1


# raysoup's quickstart with n_hparams 2 and trial seeds 0, 1, as raysoup recorded it in
# sweep.json before the reference defaults (keep best, shared LP, aux LP, 4 aux runs).
LEGACY_RECORD = {
    "fingerprint": "772c71240aa9e9ba228263f48f550178410f839c0775b9d78e95a5b0a1ce5fe9",
    "config": {
        "name": "legacy", "dataset": "MiniRotatedMNIST", "data_dir": None, "test_envs": [5],
        "trial_seeds": [0, 1], "n_hparams": 2, "inits": ["pretrained", "ratatouille", "fusing"],
        "aux_datasets": ["AuxRotationFlip", "AuxRecolourMod5", "AuxNoiseSubpop"],
        "aux_n_hparams": 1, "aux_pool": None, "steps": None, "aux_steps": None,
        "lp_stage_steps": None, "checkpoint_freq": None, "arch": None,
        "pretrained_weights": None, "hparams_registry": "diwa",
        "hparams_depend_on_trial_seed": False, "hparams": {}, "fusing_range": 4.0,
        "ratatouille_choice": "reference", "aux_buffers": "source", "holdout_fraction": 0.2,
        "cpus_per_trial": 1.0, "gpus_per_trial": 0.0, "max_failures": 2,
        "max_concurrent_trials": 0, "soup_accept": "ge", "soup_cpus": 0.0, "soup_gpus": 0.0,
        "soup_max_models": 2,
    },
}  # fmt: skip


def test_a_sweep_recorded_before_the_reference_defaults_resumes_as_it_began(
    tmp_path, capsys
) -> None:
    root = tmp_path / "legacy"
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps(LEGACY_RECORD))
    today = minirotated(name="legacy", n_hparams=2, trial_seeds=[0, 1])
    config = record_config(root, today)  # the same command as then: it resumes
    assert "recorded by an earlier raysoup" in capsys.readouterr().err
    assert (config.target_keep, config.eval_schedule) == ("last", "multiples")
    assert (config.aux_lp, config.lp_per_trial_seed, config.aux_n_hparams) == (False, True, 1)
    assert read_config(root) == config
    plan = plan_sweep(config, root)  # what it planned then: the same keys and specs
    assert [run.key for run in plan["lp"]] == [f"lp-MiniRotatedMNIST-e5-s{s}" for s in (0, 1)]
    assert [run.key for run in plan["aux"]] == [f"aux-{a}-h0" for a in config.aux_datasets]
    assert {run.spec["keep"] for run in plan["target"]} == {"last"}
    assert json.loads((root / "sweep.json").read_text()) == LEGACY_RECORD  # not rewritten
    with pytest.raises(OptionsError, match=r"different config \(changed: \['n_hparams'\]"):
        record_config(root, minirotated(name="legacy", n_hparams=3, trial_seeds=[0, 1]))
    # a new sweep records its version and resumes with today's defaults
    fresh = tmp_path / "fresh"
    assert record_config(fresh, today) == today
    assert json.loads((fresh / "sweep.json").read_text())["version"] == 2
    assert record_config(fresh, minirotated(name="legacy", n_hparams=2, trial_seeds=[0, 1]))
    with pytest.raises(OptionsError, match=r"changed: \['target_keep'\]"):
        record_config(fresh, dataclasses.replace(today, target_keep="last"))


def test_a_pool_alone_plans_base_aux_lps_and_aux_runs_only(tmp_path) -> None:
    pool = load_config(_write(tmp_path, "dataset: null\naux_n_hparams: 2\n"))
    plan = plan_sweep(pool, tmp_path)
    assert list(plan) == ["base", "lp", "aux"] and len(plan["aux"]) == 3 * 2
    assert [run.key for run in plan["lp"]] == [f"lp-{aux}-all" for aux in pool.aux_datasets]
    no_lp = load_config(_write(tmp_path, "dataset: null\naux_lp: false\n"))
    assert list(plan_sweep(no_lp, tmp_path)) == ["base", "aux"]


def _fake_checkpoint(path: Path) -> None:
    """A tiny valid checkpoint: planning checks a pool's metadata and weights headers (a
    pool is untrusted), never its tensors."""
    meta = CheckpointMeta(dataset="Aux", envs=["a"], arch="cnn", num_classes=2, stage="aux")
    save_checkpoint(path, {"featurizer.w": torch.zeros(1)}, meta)


def test_a_target_sweep_borrows_only_its_aux_datasets_from_a_pool(tmp_path) -> None:
    pool_root = tmp_path / "pool"
    pool = load_config(_write(tmp_path, "name: pool\ndataset: null\n"))
    record_config(pool_root, pool)
    for aux in pool.aux_datasets:
        _fake_checkpoint(checkpoint_path(pool_root, "aux", f"aux-{aux}-h0"))
    _fake_checkpoint(checkpoint_path(pool_root, "base", "base"))
    borrowing = minirotated(
        aux_pool=str(pool_root), aux_datasets=pool.aux_datasets[:2], aux_n_hparams=1
    )
    plan = plan_sweep(borrowing, tmp_path / "target")
    assert list(plan) == ["lp", "target"]  # the pool's base and aux runs are reused
    assert [run.key for run in plan["lp"]] == ["lp-MiniRotatedMNIST-e5-s0"]  # no aux LP
    ratatouille = next(r for r in plan["target"] if r.spec["init"] == "ratatouille").spec
    assert ratatouille["aux_dir"] == [
        checkpoint_path(pool_root, "aux", f"aux-{aux}-h0") for aux in pool.aux_datasets[:2]
    ]
    assert ratatouille["pretrained"] == checkpoint_path(pool_root, "base", "base")
    with pytest.raises(OptionsError, match=r"lacks auxiliary run\(s\) \['aux-AuxRotationFlip-h1'"):
        plan_sweep(minirotated(aux_pool=str(pool_root), aux_n_hparams=2), tmp_path)
    other_arch = SweepConfig(aux_pool=pool_root, arch="resnet18", aux_n_hparams=1).validate()
    with pytest.raises(
        OptionsError, match="trained with arch=None, this sweep has arch='resnet18'"
    ):
        plan_sweep(other_arch, tmp_path)


def test_the_quickstart_is_the_nuisance_benchmark(tmp_path) -> None:
    config = load_config(None)
    assert (config.dataset, config.test_envs, config.trial_seeds) == ("NuisanceMNIST", [2], [0])
    # every auxiliary dataset is used by ratatouille's reference choice as often
    assert config.n_hparams % (len(config.aux_datasets) + 1) == 0
    plan = plan_sweep(config, tmp_path)
    assert list(plan) == ["lp", "aux", "target"]  # the shipped foundation: no base stage
    assert len(plan["target"]) == config.n_hparams * 3 and len(plan["aux"]) == 3
    # a config file starts from SweepConfig's defaults, not the quickstart's
    assert load_config(_write(tmp_path, "name: x\n")).dataset == "MiniRotatedMNIST"


def _canonical_plan(plan: dict, root: Path) -> str:
    """A plan as JSON text, paths relative to ``root`` and tagged by type (a ``Path`` and
    a ``str`` of the same text are different specs)."""

    def value(v: object) -> object:
        if isinstance(v, Path):
            return {"path": str(v).replace(str(root), "<root>")}
        if isinstance(v, list):
            return [value(x) for x in v]
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        return v

    runs = [
        [stage, r.stage, r.key, list(r.spec), value(r.spec)] for stage in plan for r in plan[stage]
    ]
    return json.dumps(runs, sort_keys=True)


def _pool_with_runs(root: Path, aux_n_hparams: int) -> None:
    """A finished pool under ``root``: its record, base and aux checkpoints (fake weights)."""
    pool = SweepConfig(name="pool", dataset=None, aux_n_hparams=aux_n_hparams).validate()
    record_config(root, pool)
    for aux in pool.aux_datasets:
        for h in range(aux_n_hparams):
            _fake_checkpoint(checkpoint_path(root, "aux", f"aux-{aux}-h{h}"))
    _fake_checkpoint(checkpoint_path(root, "base", "base"))


def test_plans_are_pinned(tmp_path) -> None:
    """Every run, its key, order and spec, as raysoup planned them when this test was
    written (a digest of each plan): a refactoring of the planner changes none."""
    root = tmp_path / "sweep"
    small = minirotated(n_hparams=1, trial_seeds=[0, 1], test_envs=[5])
    plan = plan_sweep(small, root)
    targets = [f"target-MiniRotatedMNIST-e5-s{s}-h0-{i}" for s in (0, 1) for i in small.inits]
    assert [(r.stage, r.key) for runs in plan.values() for r in runs] == [
        ("base", "base"),
        ("lp", "lp-MiniRotatedMNIST-e5-s0"),
        *[("lp", f"lp-{aux}-all") for aux in small.aux_datasets],
        *[("aux", f"aux-{aux}-h0") for aux in small.aux_datasets],
        *[("target", key) for key in targets],
    ]
    _pool_with_runs(tmp_path / "pool", aux_n_hparams=2)
    configs = {
        "small": small,
        "wide": minirotated(n_hparams=2, trial_seeds=[0, 1], test_envs=[0, 5]),
        "switches": minirotated(
            n_hparams=2,
            trial_seeds=[0, 1],
            test_envs=[0, 5],
            lp_per_trial_seed=True,
            aux_lp=False,
            target_keep="last",
        ),
        "pretrained only": minirotated(inits=["pretrained"], trial_seeds=[0, 2]),
        "pool alone": SweepConfig(dataset=None, aux_n_hparams=2).validate(),
        "borrowing": minirotated(aux_pool=str(tmp_path / "pool"), aux_n_hparams=2),
        "quickstart": load_config(None),
    }
    digests = {
        name: hashlib.sha256(_canonical_plan(plan_sweep(c, root), tmp_path).encode()).hexdigest()
        for name, c in configs.items()
    }
    assert digests == PINNED_PLANS


# Computed with the planner of fc48adc (before plan_sweep was split into its stages).
PINNED_PLANS = {
    "small": "e04283d1dd88aa85982c0a01292e19466213b6d8e3e6fc68f3e8cf1308d5ffd2",
    "wide": "1d53a260538bfbfe64207f3e90eca99ac351b182064ab47979ecd084f7f952dc",
    "switches": "939131da6516401c00e957b0880edb55047648902d8c83703ce8ddb4f0f931d3",
    "pretrained only": "eb1d3ff2062be0a5e8918404bbd5334e2a21888c4180ca21b8bbb191b572f32d",
    "pool alone": "289532d73c3e3b1f69f02745f06bf01c8c219f594dc3f6b38388e0553d689ea2",
    "borrowing": "c051802b95f7ce6ddaec65ec36374b3c98387eb28ada812a8218ab6bfaa2baf4",
    "quickstart": "2e0ae818dea716e46c6b874328ce88eed383517ea51a6f89deb03afc10629a75",
}
