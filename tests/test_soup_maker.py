"""The soup maker on real trial checkpoints, without Ray: exactness, determinism across
arrival orders and restarts, averaging policy, content-hash changes, post-hoc CLI."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from raysoup.io.checkpoint import load_checkpoint, read_meta
from raysoup.io.layout import SweepLayout
from raysoup.results import load_results
from raysoup.soup import batch_greedy, rank_key
from raysoup.soup.evaluator import DataKey, GroupData, SoupEvaluator
from raysoup.soup.group import GroupKey, Offer
from raysoup.soup.maker import SoupMaker

TARGET = "MiniRotatedMNIST"
KEY = GroupKey(TARGET, 5, 0, "pretrained")
N_TRIALS = 6


@pytest.fixture
def trials(soup_trials: list[Offer]) -> list[Offer]:
    return soup_trials


def _maker(root: Path, trials: list[Offer], **options) -> SoupMaker:
    options.setdefault("expected", {KEY: [o.trial_id for o in trials]})
    return SoupMaker(root, "test", device="cpu", log=lambda line: None, **options)


def _soups(root: Path) -> pd.DataFrame:
    soups = load_results(root)["soups"]
    return soups.sort_values("method").reset_index(drop=True)


def _weights_hash(path: str) -> str:
    return read_meta(path).content_hash


def test_streaming_soup_equals_batch_recipe_1_in_any_arrival_order(trials, tmp_path) -> None:
    data = GroupData(DataKey(TARGET, 5, 0), None, 0.2)
    evaluator = SoupEvaluator(data, read_meta(trials[0].checkpoint), torch.device("cpu"))
    by_id = {o.trial_id: o for o in trials}

    def evaluate(ids: frozenset[str]) -> float:  # the reference: average from scratch
        ranked = sorted((by_id[i] for i in ids), key=lambda o: rank_key(o.candidate))
        states = [load_checkpoint(o.checkpoint)[0] for o in ranked]
        state = {}
        for key, first in states[0].items():
            stacked = torch.stack([s[key] for s in states])
            if first.is_floating_point():
                state[key] = stacked.double().mean(0).to(first.dtype)
            else:
                state[key] = stacked.amax(0)
        return evaluator.id_val_acc(state)

    reference = batch_greedy([o.candidate for o in trials], evaluate)
    expected = [d.trial_id for d in reference if d.accepted]
    # the ensemble, directly: each trial's logits summed in rank order, argmax
    ranked = sorted(trials, key=lambda o: rank_key(o.candidate))
    ensemble = {}
    for name, parts in (("id_val", data.id_val), ("test", data.test)):
        total = None
        for offer in ranked:
            evaluator.network.load_state_dict(load_checkpoint(offer.checkpoint)[0])
            logits, labels = data.logits(evaluator.network, parts, torch.device("cpu"))
            total = logits if total is None else total + logits
        ensemble[name] = (total.argmax(1) == labels).double().mean().item()
    # One arrival order per maker (one at a time, then in batches of 3 with no ensemble
    # logits kept on arrival); the soups must agree bit for bit.
    orders = [list(trials), list(reversed(trials)), random.Random(0).sample(trials, len(trials))]
    hashes = []
    for i, order in enumerate(orders):
        batch = 3 if i == 2 else 1
        maker = _maker(tmp_path / f"order{i}", trials, logit_cache_mb=256 if batch == 1 else 0)
        for start in range(0, len(order), batch):
            maker.offer(order[start : start + batch])
        assert not maker._logits  # released with the final group
        group = maker.groups[KEY]
        assert group.device == maker.device  # the group's running sums live there
        assert group.greedy.ingredients == expected
        assert [d.accepted for d in group.greedy.decisions] == [d.accepted for d in reference]
        soups = _soups(tmp_path / f"order{i}")
        assert list(soups.method) == ["ensemble", "erm", "greedy", "uniform", "uniform_all"]
        greedy = soups[soups.method == "greedy"].iloc[0]
        assert list(greedy.ingredients) == expected
        assert greedy.n_ingredients == len(expected)
        row = soups[soups.method == "ensemble"].iloc[0]
        assert pd.isna(row.checkpoint) and row.n_ingredients == N_TRIALS
        assert list(row.ingredients) == [o.trial_id for o in ranked]
        assert (row.id_val_acc, row.test_acc) == pytest.approx(
            (ensemble["id_val"], ensemble["test"]), abs=1e-12
        )
        hashes.append(
            [_weights_hash(c) for c in soups.checkpoint[soups.method.isin(["greedy", "uniform"])]]
            + [repr(float(a)) for a in soups.test_acc]
            + [repr(float(a)) for a in soups.id_val_acc]  # uniform_all's NaN included
        )
    assert hashes[0] == hashes[1] == hashes[2]  # ensemble included: identical numbers


def test_uniform_soup_is_the_direct_average_and_reloads_to_its_accuracies(trials, tmp_path):
    maker = _maker(tmp_path, trials)
    maker.offer(trials)
    soups = _soups(tmp_path)
    uniform = soups[soups.method == "uniform"].iloc[0]
    assert uniform.n_ingredients == N_TRIALS
    assert sorted(uniform.ingredients) == sorted(o.trial_id for o in trials)
    soup_state, meta = load_checkpoint(uniform.checkpoint)
    assert meta.stage == "soup" and meta.init["method"] == "uniform"
    states = [load_checkpoint(o.checkpoint)[0] for o in trials]
    floats = [k for k, v in soup_state.items() if v.is_floating_point()]
    ints = [k for k, v in soup_state.items() if not v.is_floating_point()]
    assert any("running_mean" in k for k in floats) and ints  # the CNN has BatchNorm
    for key in floats:  # parameters *and* BatchNorm statistics are averaged
        direct = torch.stack([s[key].double() for s in states]).mean(0).float()
        torch.testing.assert_close(soup_state[key], direct, rtol=0, atol=1e-6)
    for key in ints:  # num_batches_tracked: the maximum over ingredients
        assert torch.equal(soup_state[key], torch.stack([s[key] for s in states]).amax(0))
    # reload: the checkpoint scores what its row and metadata say
    data = GroupData(DataKey(TARGET, 5, 0), None, 0.2)
    evaluator = SoupEvaluator(data, meta, torch.device("cpu"))
    for _, row in soups[soups.method.isin(["erm", "greedy", "uniform"])].iterrows():
        state, _ = load_checkpoint(row.checkpoint)
        assert evaluator.id_val_acc(state) == pytest.approx(row.id_val_acc, abs=0)
        assert evaluator.test_acc(state) == pytest.approx(row.test_acc, abs=0)
    # uniform_all of one trial seed is that seed's uniform soup: the same weights, bit for bit
    everything = soups[soups.method == "uniform_all"].iloc[0]
    assert everything.trial_seed == -1 and math.isnan(everything.id_val_acc)
    assert everything.checkpoint.endswith(
        "checkpoints/soup/uniform_all/MiniRotatedMNIST-e5-sall-pretrained"
    )
    assert _weights_hash(everything.checkpoint) == _weights_hash(uniform.checkpoint)
    assert everything.test_acc == uniform.test_acc
    assert list(everything.ingredients) == list(uniform.ingredients)
    assert read_meta(everything.checkpoint).trial_seed == -1
    # a one-ingredient soup scores exactly its trial's own reported number
    best = min(trials, key=lambda o: rank_key(o.candidate))
    assert evaluator.id_val_acc(load_checkpoint(best.checkpoint)[0]) == best.id_val_acc


def test_restart_restores_without_evaluating_and_ends_identical(trials, tmp_path) -> None:
    undisturbed = _maker(tmp_path / "calm", trials)
    undisturbed.offer(trials)
    first = _maker(tmp_path / "restarted", trials)
    first.offer(trials[:3])
    first.offer(trials[:2])  # a re-delivery is a no-op
    assert len(first.groups[KEY].offers) == 3
    steps_before = load_results(tmp_path / "restarted")["soup_steps"]
    # "restart": a new maker on the same storage (what a restarted actor does)
    second = _maker(tmp_path / "restarted", trials)
    assert second.n_scorings == 0 and len(second.groups[KEY].offers) == 3
    steps_after = load_results(tmp_path / "restarted")["soup_steps"]
    pd.testing.assert_frame_equal(steps_before, steps_after)  # same decisions, same times
    second.offer(trials)  # the rest (and the first three again)
    calm, restarted = _soups(tmp_path / "calm"), _soups(tmp_path / "restarted")
    columns = ["method", "trial_seed", "n_ingredients", "id_val_acc", "test_acc"]
    pd.testing.assert_frame_equal(calm[columns], restarted[columns])  # ensemble, uniform_all too
    assert [list(x) for x in calm.ingredients] == [list(x) for x in restarted.ingredients]
    assert list(calm.method) == ["ensemble", "erm", "greedy", "uniform", "uniform_all"]
    for a, b in zip(calm.checkpoint[2:], restarted.checkpoint[2:], strict=True):
        assert _weights_hash(a) == _weights_hash(b)
    steps = load_results(tmp_path / "restarted")["soup_steps"]
    assert steps.trial_id.is_unique and len(steps) == N_TRIALS
    # a third maker after the end: nothing to redo, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "restarted").rglob("*.parquet")}
    third = _maker(tmp_path / "restarted", trials)
    third.offer(trials)
    assert third.finalize_all() == []
    assert third.n_scorings == 0
    assert len(_soups(tmp_path / "restarted")) == 5
    soup_parts = {p: m for p, m in mtimes.items() if "soups" in p.parts}
    assert soup_parts == {p: p.stat().st_mtime_ns for p in soup_parts}


def test_a_replaced_checkpoint_is_noticed_by_its_content_hash(
    trials, tmp_path, base_checkpoint, train_target
) -> None:
    copies = []
    for offer in trials[:4]:
        path = tmp_path / "ckpt" / offer.trial_id
        shutil.copytree(offer.checkpoint, path)
        copies.append(Offer.from_checkpoint(offer.trial_id, path))
    maker = _maker(tmp_path / "run", copies)
    maker.offer(copies[:3])
    # trial 0 is re-run after a crash (other weights, same place); nobody re-offers it
    train_target(Path(copies[0].checkpoint), 0, base_checkpoint, steps=31)
    maker.offer(copies[3:])  # completes the group: finalize re-reads every hash
    group = maker.groups[KEY]
    new_hash = read_meta(copies[0].checkpoint).content_hash
    assert group.offers[copies[0].trial_id].content_hash == new_hash != copies[0].content_hash
    # the soup equals a fresh maker's over the current checkpoints
    fresh = _maker(tmp_path / "fresh", copies)
    fresh.offer([Offer.from_checkpoint(o.trial_id, o.checkpoint) for o in copies])
    assert group.greedy.ingredients == fresh.groups[KEY].greedy.ingredients
    a, b = _soups(tmp_path / "run"), _soups(tmp_path / "fresh")
    assert list(a.test_acc) == list(b.test_acc)
    assert list(a.id_val_acc[a.method == "ensemble"]) == list(b.id_val_acc[b.method == "ensemble"])
    assert len(a) == 5  # replaced, not duplicated


def test_accept_gt_never_takes_a_tie_and_bad_options_are_refused(trials, tmp_path) -> None:
    ge = _maker(tmp_path / "ge", trials, methods=("erm", "greedy"))
    ge.offer(trials)
    gt = _maker(tmp_path / "gt", trials, accept="gt", methods=("erm", "greedy"))
    gt.offer(trials)
    steps = load_results(tmp_path / "gt")["soup_steps"].sort_values("rank")
    previous = None
    for _, row in steps.iterrows():
        if previous is not None and row.accepted:
            assert row.soup_id_val_acc > previous
        previous = row.soup_id_val_acc
    assert set(gt.groups[KEY].greedy.ingredients) <= set(ge.groups[KEY].offers)
    with pytest.raises(ValueError, match="accept='max'"):
        SoupMaker(tmp_path, "x", accept="max")
    with pytest.raises(ValueError, match="methods"):
        SoupMaker(tmp_path, "x", methods=["median"])
    with pytest.raises(ValueError, match="accept="):
        SoupMaker(tmp_path / "ge", "test", accept="gt")  # the stored state says ge


def test_state_file_is_plain_json_with_every_decision(trials, tmp_path) -> None:
    maker = _maker(tmp_path, trials)
    maker.offer(trials[:4])
    state = json.loads(Path(SweepLayout(tmp_path).soup_state).read_text())
    (group,) = state["groups"]
    assert len(group["offers"]) == 4 and len(group["decided_at"]) == 4
    assert all(0 <= acc <= 1 for _, acc in group["memo"])
    assert not group["final"]  # 4 of 6 trials: not final yet
    assert maker.summary()[0]["final"] == [] and maker.summary()[0]["trials"] == 4


def test_one_trial_ensemble_is_that_trial_exactly(trials, tmp_path) -> None:
    """The ensemble is scored on the trials' own ID-val and test splits and batches, so a
    one-trial ensemble (and a one-trial uniform_all) scores exactly its trial's numbers."""
    one = trials[1]
    maker = _maker(tmp_path, [one], methods=("erm", "ensemble", "uniform_all"))
    maker.offer([one])  # completes the group (and its seeds): everything is written
    assert maker.finalize_all() == []
    soups = _soups(tmp_path).set_index("method")
    assert list(soups.index) == ["ensemble", "erm", "uniform_all"]
    assert soups.loc["ensemble", "id_val_acc"] == one.id_val_acc
    assert soups.loc["ensemble", "test_acc"] == one.test_acc
    assert soups.loc["uniform_all", "test_acc"] == one.test_acc
    assert pd.isna(soups.loc["ensemble", "checkpoint"])


def test_uniform_all_waits_for_every_trial_seed_then_averages_them_all(
    trials, tmp_path, base_checkpoint, train_target
) -> None:
    seed1 = []
    for h in range(2):  # two real trials of trial seed 1 (other splits)
        path = tmp_path / "ckpt" / f"s1-h{h}"
        train_target(path, h, base_checkpoint, steps=10, trial_seed=1)
        seed1.append(Offer.from_checkpoint(f"s1-h{h}", path))
    seed0 = trials[:2]
    key1 = GroupKey(TARGET, 5, 1, "pretrained")
    expected = {KEY: [o.trial_id for o in seed0], key1: [o.trial_id for o in seed1]}
    methods = ("erm", "uniform_all")
    maker = _maker(tmp_path / "run", trials, expected=expected, methods=methods)
    maker.offer(seed0)  # seed 0 is complete, seed 1 is not: no uniform_all yet
    assert list(_soups(tmp_path / "run").method) == ["erm"]
    maker.offer(seed1[::-1])
    soups = _soups(tmp_path / "run")
    assert list(soups.method) == ["erm", "erm", "uniform_all"]
    row = soups.iloc[2]
    assert row.trial_seed == -1 and math.isnan(row.id_val_acc) and row.n_ingredients == 4
    by_seed = [sorted(g, key=lambda o: rank_key(o.candidate)) for g in (seed0, seed1)]
    assert list(row.ingredients) == [o.trial_id for g in by_seed for o in g]
    state, meta = load_checkpoint(row.checkpoint)
    states = [load_checkpoint(o.checkpoint)[0] for o in seed0 + seed1]
    for key, value in state.items():
        if value.is_floating_point():
            direct = torch.stack([s[key].double() for s in states]).mean(0).float()
            torch.testing.assert_close(value, direct, rtol=0, atol=1e-6)
    data = GroupData(DataKey(TARGET, 5, 0), None, 0.2)  # test: the whole env (seed 0's batches)
    assert SoupEvaluator(data, meta, torch.device("cpu")).test_acc(state) == row.test_acc
    # a restarted maker has it: nothing recomputed, nothing duplicated
    again = _maker(tmp_path / "run", trials, expected=expected, methods=methods)
    again.offer(seed0 + seed1)
    assert again.finalize_all() == [] and again.n_scorings == 0
    assert len(_soups(tmp_path / "run")) == 3
