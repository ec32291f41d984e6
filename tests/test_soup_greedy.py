"""Greedy soup (batch vs streaming) and running uniform averages."""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import raysoup.soup.average as average_module
from raysoup.soup import (
    ACCEPT,
    Candidate,
    Decision,
    RunningSoup,
    StreamingGreedy,
    batch_greedy,
    better,
    rank_key,
    uniform_average,
)

GRID = [round(0.05 * i, 2) for i in range(21)]  # coarse grid: ties are frequent


class FakeEvaluator:
    """Deterministic accuracy of a soup, from a seeded hash of its ids and their contents.

    ``contents`` maps a trial id to its current content hash (as a checkpoint store would),
    so replacing a checkpoint changes what its sets evaluate to.
    """

    def __init__(self, seed: int, spread: int = 6) -> None:
        self.seed = seed
        self.spread = spread
        self.contents: dict[str, str] = {}
        self.calls: Counter[frozenset[tuple[str, str]]] = Counter()

    def key(self, ids: frozenset[str]) -> frozenset[tuple[str, str]]:
        return frozenset((i, self.contents.get(i, "")) for i in ids)

    def __call__(self, ids: frozenset[str]) -> float:
        key = self.key(ids)
        self.calls[key] += 1
        text = f"{self.seed}|" + ",".join(f"{i}:{h}" for i, h in sorted(key))
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
        return GRID[10 + digest % (2 * self.spread + 1) - self.spread]  # 0.2 .. 0.8


def outcome(decisions: list[Decision]) -> list[tuple]:
    return [
        (d.trial_id, d.rank, d.candidate_id_val_acc, d.accepted, d.soup_size, d.soup_id_val_acc)
        for d in decisions
    ]


def accepted_ids(decisions: list[Decision]) -> list[str]:
    return [d.trial_id for d in decisions if d.accepted]


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[list[Candidate], int]:
    """Candidates in arrival order; some trials arrive again (same, or a new version)."""
    n = draw(st.integers(1, 12))
    accs = st.sampled_from(GRID[6:])
    first = [
        Candidate(f"t{i:02d}", draw(accs), draw(st.sampled_from(["", "a", "b"]))) for i in range(n)
    ]
    order = draw(st.permutations(first))
    stream = list(order)
    for _ in range(draw(st.integers(0, 3))):
        old = draw(st.sampled_from(first))
        new = Candidate(
            old.trial_id,
            draw(st.sampled_from([old.id_val_acc, *GRID[6:]])),
            draw(st.sampled_from([old.content_hash, "c", "d"])),
        )
        stream.insert(draw(st.integers(0, len(stream))), new)
    return stream, draw(st.integers(0, 2**16))


@settings(max_examples=200, deadline=None)
@given(arrivals(), st.sampled_from(ACCEPT))
def test_streaming_equals_batch_after_every_arrival(case, accept):
    stream, seed = case
    streaming_eval = FakeEvaluator(seed)
    soup = StreamingGreedy(streaming_eval, accept=accept)
    latest: dict[str, Candidate] = {}
    for c in stream:
        if c.trial_id in latest and latest[c.trial_id] == c:
            assert soup.add(c) == []
            continue
        streaming_eval.contents[c.trial_id] = c.content_hash
        latest[c.trial_id] = c
        before = outcome(soup.decisions)
        returned = soup.add(c)

        batch_eval = FakeEvaluator(seed)
        batch_eval.contents = dict(streaming_eval.contents)
        expected = batch_greedy(list(latest.values()), batch_eval, accept=accept)
        assert outcome(soup.decisions) == outcome(expected)
        assert soup.ingredients == accepted_ids(expected)
        assert soup.soup_id_val_acc == expected[-1].soup_id_val_acc
        assert len(soup) == len(latest)
        # what add() returned is the current decision for those trials, including c's own
        current = {d.trial_id: d for d in soup.decisions}
        assert c.trial_id in {d.trial_id for d in returned}
        assert all(current[d.trial_id] == d for d in returned)
        # anything not returned kept its outcome (only its rank may have moved)
        old = {row[0]: row[2:] for row in before}
        for d in soup.decisions:
            if d not in returned:
                assert old[d.trial_id] == outcome([d])[0][2:]

    # an ingredient set (with its contents) is never evaluated twice
    assert all(n == 1 for n in streaming_eval.calls.values())
    assert soup.n_evaluations == sum(streaming_eval.calls.values())


@settings(max_examples=200, deadline=None)
@given(arrivals(), st.sampled_from(ACCEPT), st.data())
def test_batches_equal_batch_greedy_and_decide_each_rank_at_most_once(case, accept, data):
    stream, seed = case
    evaluate = FakeEvaluator(seed)
    soup = StreamingGreedy(evaluate, accept=accept)
    latest: dict[str, Candidate] = {}
    while stream:
        size = data.draw(st.integers(1, len(stream)))
        batch, stream = stream[:size], stream[size:]
        for c in batch:
            evaluate.contents[c.trial_id] = c.content_hash
            latest[c.trial_id] = c
        n_before = soup.n_evaluations
        returned = soup.add_many(batch)
        assert soup.n_evaluations - n_before <= len(soup)  # each rank at most once
        batch_eval = FakeEvaluator(seed)
        batch_eval.contents = dict(evaluate.contents)
        expected = batch_greedy(list(latest.values()), batch_eval, accept=accept)
        assert outcome(soup.decisions) == outcome(expected)
        assert soup.soup_id_val_acc == expected[-1].soup_id_val_acc
        current = {d.trial_id: d for d in soup.decisions}
        assert all(current[d.trial_id] == d for d in returned)
        assert [d.rank for d in returned] == sorted(d.rank for d in returned)
    assert all(n == 1 for n in evaluate.calls.values())


def test_a_batch_costs_fewer_evaluations_than_one_by_one():
    # every newcomer is accepted: one by one, each re-decides all ranks below it
    def evaluate(ids: frozenset[str]) -> float:
        return 0.9 + 0.01 * len(ids)

    candidates = [Candidate(f"t{i}", 0.9 - 0.01 * i) for i in range(8)]
    one_by_one = StreamingGreedy(evaluate)
    for c in reversed(candidates):  # worst first: every arrival lands on top
        one_by_one.add(c)
    batched = StreamingGreedy(evaluate)
    batched.add_many(reversed(candidates))
    assert batched.ingredients == one_by_one.ingredients == [c.trial_id for c in candidates]
    assert batched.n_evaluations == len(candidates) - 1 < one_by_one.n_evaluations


def test_rejected_newcomer_costs_one_evaluation():
    soup = StreamingGreedy(lambda ids: 0.9 if ids == {"a", "b", "c"} else 0.1)
    for trial_id, acc in [("a", 0.9), ("c", 0.5), ("d", 0.3)]:
        soup.add(Candidate(trial_id, acc))
    assert soup.ingredients == ["a"]
    n = soup.n_evaluations
    returned = soup.add(Candidate("b", 0.7))  # rank 1, rejected: c and d are untouched
    assert soup.n_evaluations == n + 1
    assert [d.trial_id for d in returned] == ["b"]
    assert [d.rank for d in soup.decisions] == [0, 1, 2, 3]


def test_accept_modes_and_tie_order():
    candidates = [Candidate("b", 0.5), Candidate("a", 0.5), Candidate("c", 0.4)]
    assert [c.trial_id for c in sorted(candidates, key=rank_key)] == ["a", "b", "c"]
    flat = batch_greedy(candidates, lambda ids: 0.5, accept="ge")
    assert [d.accepted for d in flat] == [True, True, True]
    assert flat[-1].soup_size == 3
    strict = batch_greedy(candidates, lambda ids: 0.5, accept="gt")
    assert [d.accepted for d in strict] == [True, False, False]
    assert better(0.5, 0.5, "ge") and not better(0.5, 0.5, "gt")


def test_best_candidate_is_not_evaluated():
    calls: list[frozenset[str]] = []

    def evaluate(ids: frozenset[str]) -> float:
        calls.append(ids)
        return 0.6

    decisions = batch_greedy([Candidate("x", 0.7), Candidate("y", 0.6)], evaluate)
    assert calls == [frozenset({"x", "y"})]
    assert decisions[0] == Decision("x", 0, 0.7, True, 1, 0.7)
    assert decisions[1] == Decision("y", 1, 0.6, False, 1, 0.7)


def test_replacement_by_content_hash_is_reevaluated():
    contents = {"a": "h1", "b": "h1"}
    scores = {("h1", "h1"): 0.3, ("h1", "h2"): 0.95}
    n_calls = Counter()

    def evaluate(ids: frozenset[str]) -> float:
        n_calls[ids] += 1
        return scores[(contents["a"], contents["b"])]

    soup = StreamingGreedy(evaluate)
    soup.add(Candidate("a", 0.8, "h1"))
    soup.add(Candidate("b", 0.6, "h1"))
    assert soup.ingredients == ["a"]
    assert soup.add(Candidate("b", 0.6, "h1")) == []  # idempotent
    assert soup.n_evaluations == 1

    contents["b"] = "h2"
    returned = soup.add(Candidate("b", 0.6, "h2"))
    assert soup.ingredients == ["a", "b"]
    assert soup.soup_id_val_acc == 0.95
    assert [d.trial_id for d in returned] == ["b"]
    assert n_calls[frozenset({"a", "b"})] == 2  # new content, new evaluation
    assert soup.n_evaluations == 2


def test_replacement_by_accuracy_moves_the_candidate():
    def evaluate(ids: frozenset[str]) -> float:
        return 0.5

    soup = StreamingGreedy(evaluate)
    for trial_id, acc in [("a", 0.9), ("b", 0.6), ("c", 0.4)]:
        soup.add(Candidate(trial_id, acc))
    returned = soup.add(Candidate("c", 0.95))  # the new best: everything is re-decided
    assert [d.trial_id for d in soup.decisions] == ["c", "a", "b"]
    assert [d.trial_id for d in returned] == ["c", "a", "b"]
    assert outcome(soup.decisions) == outcome(
        batch_greedy([Candidate("a", 0.9), Candidate("b", 0.6), Candidate("c", 0.95)], evaluate)
    )
    assert soup.memo_hits >= 1  # {a, b, c} was already known
    assert len(soup) == 3


def test_failed_evaluation_leaves_the_soup_unchanged():
    def evaluate(ids: frozenset[str]) -> float:
        if "boom" in ids:
            raise RuntimeError("evaluation failed")
        return 0.9

    soup = StreamingGreedy(evaluate)
    soup.add(Candidate("a", 0.8))
    soup.add(Candidate("b", 0.5))
    before = soup.decisions
    with pytest.raises(RuntimeError):
        soup.add(Candidate("boom", 0.6))
    assert soup.decisions == before and len(soup) == 2
    assert [d.trial_id for d in soup.add(Candidate("c", 0.7))] == ["c", "b"]


def test_empty():
    assert batch_greedy([], lambda ids: 0.0) == []
    soup = StreamingGreedy(lambda ids: 0.0)
    assert soup.decisions == [] and soup.ingredients == []
    assert math.isnan(soup.soup_id_val_acc)


@pytest.mark.parametrize(
    ("acc", "shown"), [(float("nan"), "nan"), (1.5, "1.5"), (-0.1, "-0.1"), (float("inf"), "inf")]
)
def test_bad_accuracy_names_trial_and_value(acc, shown):
    with pytest.raises(ValueError, match=rf"'bad'.*{shown}"):
        batch_greedy([Candidate("ok", 0.5), Candidate("bad", acc)], lambda ids: 0.5)
    with pytest.raises(ValueError, match=rf"'bad'.*{shown}"):
        StreamingGreedy(lambda ids: 0.5).add(Candidate("bad", acc))


def test_bad_evaluate_result_names_the_soup():
    with pytest.raises(ValueError, match=r"soup \['a', 'b'\].*nan"):
        batch_greedy([Candidate("a", 0.5), Candidate("b", 0.4)], lambda ids: float("nan"))


def test_duplicates_and_unknown_accept():
    dupes = [Candidate("x", 0.5), Candidate("y", 0.4), Candidate("x", 0.3), Candidate("y", 0.4)]
    with pytest.raises(ValueError, match=r"duplicate trial_ids: \['x', 'y'\]"):
        batch_greedy(dupes, lambda ids: 0.5)
    with pytest.raises(ValueError, match=r"'gte'.*\('ge', 'gt'\)"):
        batch_greedy([Candidate("x", 0.5)], lambda ids: 0.5, accept="gte")
    with pytest.raises(ValueError, match=r"'gte'.*\('ge', 'gt'\)"):
        StreamingGreedy(lambda ids: 0.5, accept="gte")
    with pytest.raises(ValueError, match="'gte'"):
        better(0.5, 0.5, "gte")


# ---------------------------------------------------------------- averaging


def _state(seed: int, dtype: torch.dtype = torch.float32, batches: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g).to(dtype),
        "bn.weight": torch.rand(4, generator=g).to(dtype),
        "bn.running_mean": torch.randn(4, generator=g).to(dtype),
        "bn.running_var": torch.rand(4, generator=g).to(dtype),
        "bn.num_batches_tracked": torch.tensor(batches),
        "fc.weight": torch.randn(2, 4, generator=g).to(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("accum_dtype", [torch.float64, torch.float32])
def test_running_soup_is_the_mean(dtype, accum_dtype):
    states = [_state(seed, dtype, batches=seed * 7) for seed in range(5)]
    soup = RunningSoup(accum_dtype=accum_dtype)
    for state in states:
        soup.add(state)
    assert soup.count == 5
    averaged = soup.average()
    assert list(averaged) == list(states[0])
    for key, value in averaged.items():
        assert value.dtype == states[0][key].dtype
        if value.is_floating_point():
            expected = torch.stack([s[key].double() for s in states]).mean(0).to(dtype)
            torch.testing.assert_close(value, expected)
    assert averaged["bn.num_batches_tracked"].item() == 28  # the maximum over ingredients


@pytest.mark.parametrize("large", [0, 10, 1 << 14])  # all, some, no tensors "large"
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reuse", [False, True])
def test_average_with_is_add_then_average_bit_for_bit_and_leaves_the_soup(
    dtype, reuse, large, monkeypatch
):
    monkeypatch.setattr(average_module, "BUFFER_NUMEL", large)
    a, b, c, d = (_state(seed, dtype, batches=seed * 3) for seed in (4, 5, 6, 7))
    soup = RunningSoup()
    assert all(torch.equal(v, a[k]) for k, v in soup.average_with(a, reuse=reuse).items())
    soup.add(a)
    soup.add(b)
    before = soup.average()
    soup.average_with(d, reuse=reuse)  # an earlier try: its buffers are overwritten below
    tried = soup.average_with(c, reuse=reuse)
    for key, value in soup.average().items():  # untouched
        assert torch.equal(value, before[key])
    soup.add(c)
    for key, value in soup.average().items():
        assert value.dtype == dtype or key == "bn.num_batches_tracked"
        assert torch.equal(tried[key], value), key
    assert tried["bn.num_batches_tracked"].item() == 18
    # the soup of the same states in the same order, from scratch: the same bits
    for key, value in uniform_average([a, b, c]).items():
        assert torch.equal(tried[key], value), key


def test_average_with_reuse_writes_into_the_same_buffers(monkeypatch):
    monkeypatch.setattr(average_module, "BUFFER_NUMEL", 10)  # fc.weight (8) is small
    a, b, c = (_state(seed) for seed in (1, 2, 3))
    soup = RunningSoup()
    soup.add(a)
    first = soup.average_with(b, reuse=True)
    kept = {k: v.clone() for k, v in first.items()}
    second = soup.average_with(c, reuse=True)
    assert second["conv.weight"].data_ptr() == first["conv.weight"].data_ptr()
    assert not torch.equal(first["conv.weight"], kept["conv.weight"])  # overwritten
    assert torch.equal(first["fc.weight"], kept["fc.weight"])  # small: new tensors
    fresh = soup.average_with(b)  # reuse=False: new tensors
    assert fresh["conv.weight"].data_ptr() != second["conv.weight"].data_ptr()
    assert all(torch.equal(fresh[k], v) for k, v in kept.items())
    assert soup.average()["conv.weight"].data_ptr() != soup.average()["conv.weight"].data_ptr()


def test_integer_buffers_take_the_running_maximum():
    soup = RunningSoup()
    seen = []
    for batches in (5, 9, 7):
        soup.add(_state(0, batches=batches))
        seen.append(batches)
        assert soup.average()["bn.num_batches_tracked"].item() == max(seen)
    assert soup.average_with(_state(0, batches=11))["bn.num_batches_tracked"].item() == 11
    assert soup.average()["bn.num_batches_tracked"].item() == 9  # the try left it as it was


def test_mismatch_names_the_tensor():
    soup = RunningSoup()
    soup.add(_state(0))
    bad_shape = _state(1)
    bad_shape["fc.weight"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"'fc.weight'.*\(3, 4\)"):
        soup.add(bad_shape)
    missing = _state(1)
    del missing["bn.running_var"]
    with pytest.raises(ValueError, match=r"bn\.running_var"):
        soup.add(missing)
    kind = _state(1)
    kind["bn.weight"] = torch.ones(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"bn\.weight"):
        soup.add(kind)
    assert soup.count == 1  # a rejected state leaves the soup untouched


def test_uniform_average_of_identical_states():
    state = _state(3, torch.float32)
    averaged = uniform_average([state] * 4)
    for key, value in state.items():
        torch.testing.assert_close(averaged[key], value, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        uniform_average([])


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_sums_follow_device_argument(device):
    states = [_state(seed, torch.bfloat16, batches=seed) for seed in range(3)]
    soup = RunningSoup(device=device)
    for state in states:
        soup.add(state)  # CPU states, sums on `device`
    averaged = soup.average()
    assert all(v.device.type == device for v in averaged.values())
    expected = uniform_average(states)
    for key, value in averaged.items():
        torch.testing.assert_close(value.cpu(), expected[key])
