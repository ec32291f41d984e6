"""The soup maker on real trial checkpoints, without Ray: exactness, determinism across
arrival orders and restarts, averaging policy, content-hash changes, post-hoc CLI."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from raysoup.io.checkpoint import load_checkpoint, read_meta
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
    # One arrival order per maker; the soups must agree bit for bit.
    orders = [list(trials), list(reversed(trials)), random.Random(0).sample(trials, len(trials))]
    hashes = []
    for i, order in enumerate(orders):
        maker = _maker(tmp_path / f"order{i}", trials)
        maker.offer(order)
        group = maker.groups[KEY]
        assert group.device == maker.device  # the group's running sums live there
        assert group.greedy.ingredients == expected
        assert [d.accepted for d in group.greedy.decisions] == [d.accepted for d in reference]
        soups = _soups(tmp_path / f"order{i}")
        assert list(soups.method) == ["erm", "greedy", "uniform"]
        greedy = soups[soups.method == "greedy"].iloc[0]
        assert list(greedy.ingredients) == expected
        assert greedy.n_ingredients == len(expected)
        hashes.append(
            [_weights_hash(c) for c in soups.checkpoint[soups.method != "erm"]]
            + [float(a) for a in soups.test_acc]
        )
    assert hashes[0] == hashes[1] == hashes[2]


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
    for _, row in soups.iterrows():
        state, _ = load_checkpoint(row.checkpoint)
        assert evaluator.id_val_acc(state) == pytest.approx(row.id_val_acc, abs=0)
        assert evaluator.test_acc(state) == pytest.approx(row.test_acc, abs=0)
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
    assert second.n_evaluations == 0 and len(second.groups[KEY].offers) == 3
    steps_after = load_results(tmp_path / "restarted")["soup_steps"]
    pd.testing.assert_frame_equal(steps_before, steps_after)  # same decisions, same times
    second.offer(trials)  # the rest (and the first three again)
    calm, restarted = _soups(tmp_path / "calm"), _soups(tmp_path / "restarted")
    columns = ["method", "n_ingredients", "id_val_acc", "test_acc"]
    pd.testing.assert_frame_equal(calm[columns], restarted[columns])
    assert [list(x) for x in calm.ingredients] == [list(x) for x in restarted.ingredients]
    for a, b in zip(calm.checkpoint[1:], restarted.checkpoint[1:], strict=True):
        assert _weights_hash(a) == _weights_hash(b)
    steps = load_results(tmp_path / "restarted")["soup_steps"]
    assert steps.trial_id.is_unique and len(steps) == N_TRIALS
    # a third maker after the end: nothing to redo, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "restarted").rglob("*.parquet")}
    third = _maker(tmp_path / "restarted", trials)
    third.offer(trials)
    assert third.finalize_all() == []
    assert third.n_evaluations == 0
    assert len(_soups(tmp_path / "restarted")) == 3
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
    assert len(a) == 3  # replaced, not duplicated


def test_accept_gt_never_takes_a_tie_and_bad_options_are_refused(trials, tmp_path) -> None:
    ge = _maker(tmp_path / "ge", trials)
    ge.offer(trials)
    gt = _maker(tmp_path / "gt", trials, accept="gt")
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
    state = json.loads((tmp_path / "soup" / "state.json").read_text())
    (group,) = state["groups"]
    assert len(group["offers"]) == 4 and len(group["decided_at"]) == 4
    assert all(0 <= acc <= 1 for _, acc in group["memo"])
    assert not group["final"]  # 4 of 6 trials: not final yet
    assert maker.summary()[0]["final"] == [] and maker.summary()[0]["trials"] == 4
