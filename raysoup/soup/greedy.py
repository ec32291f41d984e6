"""Greedy soup (Recipe 1), in batch and streaming form.

Recipe 1: sort the candidates by ID-val accuracy, best first; the best one starts the soup;
each next candidate joins iff the ID-val accuracy of the average of (soup + candidate) is
``>=`` (``accept="ge"``, DiWA/Ratatouille) or ``>`` (``accept="gt"``, model soups) the
soup's. One and the same ID-val number is used for sorting and for accepting, so the
one-ingredient soup's accuracy is the best candidate's own ``id_val_acc`` (not evaluated).

Recipe 1 is *prefix-determined*: the decision at rank ``r`` depends only on the candidates
ranked above ``r``. A newcomer's accuracy is known on arrival, hence so is its rank; the
decisions above it stay valid. If it is rejected, the soup after it equals the soup before
it, so the decisions below stay valid too. Only an accepted newcomer (or a removed accepted
candidate) forces re-deciding the ranks below it, and since a given ingredient *set* always
evaluates to the same number, evaluations are memoised by set. ``StreamingGreedy`` thus holds,
after every ``add``, exactly ``batch_greedy`` of the candidates received so far.

Trials that arrive together are best added together (``add_many``): placed by rank first,
then decided in one walk, each rank at most once, instead of once per accepted newcomer
above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from raysoup.contract import ACCEPT

Evaluate = Callable[[frozenset[str]], float]


@dataclass(frozen=True)
class Candidate:
    """A finished trial offered to the soup; ``content_hash`` identifies its weights."""

    trial_id: str
    id_val_acc: float
    content_hash: str = ""


@dataclass
class Decision:
    """The Recipe-1 decision for one candidate; ``soup_*`` describe the soup after it.

    ``rank`` is 0-based: rank 0 is the best candidate, which always starts the soup.
    """

    trial_id: str
    rank: int
    candidate_id_val_acc: float
    accepted: bool
    soup_size: int
    soup_id_val_acc: float


def better(new: float, old: float, accept: str) -> bool:
    """Whether ``new`` beats ``old``: ``>=`` for ``"ge"`` (DiWA default), ``>`` for ``"gt"``."""
    if accept == "ge":
        return new >= old
    if accept == "gt":
        return new > old
    raise ValueError(f"unknown accept {accept!r}; expected one of {ACCEPT}")


def rank_key(c: Candidate) -> tuple[float, str]:
    """Best first; ties broken by ``trial_id``.

    The reference sorts with Python's stable sort, so its tie order is whatever order the
    checkpoint directories were listed in; breaking ties by id makes the ranking (and thus
    the soup) independent of arrival order, which streaming needs.
    """
    return (-c.id_val_acc, c.trial_id)


def _check_accept(accept: str) -> None:
    if accept not in ACCEPT:
        raise ValueError(f"unknown accept {accept!r}; expected one of {ACCEPT}")


def _check_accuracy(value: object, what: str) -> float:
    """An accuracy must be a finite fraction in [0, 1]; NaN would silently reject everything."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"accuracy of {what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"accuracy of {what} must be a finite fraction in [0, 1], got {value}")
    return value


def _check_candidate(c: Candidate) -> None:
    if not isinstance(c.trial_id, str) or not c.trial_id:
        raise ValueError(f"trial_id must be a non-empty string, got {c.trial_id!r}")
    _check_accuracy(c.id_val_acc, f"trial {c.trial_id!r}")


def _evaluate_checked(evaluate: Evaluate, ids: frozenset[str]) -> float:
    return _check_accuracy(evaluate(ids), f"soup {sorted(ids)}")


def batch_greedy(
    candidates: Iterable[Candidate], evaluate: Evaluate, accept: str = "ge"
) -> list[Decision]:
    """Plain Recipe 1 (the reference implementation); one decision per candidate, by rank.

    ``evaluate`` maps a set of trial ids to the ID-val accuracy of their uniform average.
    """
    _check_accept(accept)
    candidates = list(candidates)
    seen: set[str] = set()
    duplicates: set[str] = set()
    for c in candidates:
        _check_candidate(c)  # before sorting: a NaN key would sort arbitrarily
        (duplicates if c.trial_id in seen else seen).add(c.trial_id)
    if duplicates:
        raise ValueError(f"duplicate trial_ids: {sorted(duplicates)}")
    ranked = sorted(candidates, key=rank_key)
    decisions: list[Decision] = []
    soup: set[str] = set()
    soup_acc = math.nan
    for rank, c in enumerate(ranked):
        if rank == 0:
            soup, soup_acc, accepted = {c.trial_id}, c.id_val_acc, True
        else:
            acc = _evaluate_checked(evaluate, frozenset(soup | {c.trial_id}))
            accepted = better(acc, soup_acc, accept)
            if accepted:
                soup.add(c.trial_id)
                soup_acc = acc
        decisions.append(Decision(c.trial_id, rank, c.id_val_acc, accepted, len(soup), soup_acc))
    return decisions


_Key = frozenset[tuple[str, str]]  # (trial_id, content_hash) of every ingredient


@dataclass(frozen=True)
class _Step:
    """The soup before and after one candidate's decision (by content, not just by id)."""

    before: _Key
    before_acc: float | None  # None: empty soup (this candidate is rank 0)
    after: _Key
    after_acc: float


class StreamingGreedy:
    """Incremental, exact Recipe 1: after any ``add`` sequence it equals ``batch_greedy``.

    ``evaluate`` must be a deterministic function of the ingredient set (as in batch mode);
    memoisation is keyed by ids *and* content hashes, so a replaced checkpoint is re-evaluated.
    """

    def __init__(
        self, evaluate: Evaluate, accept: str = "ge", memo: Mapping[_Key, float] | None = None
    ) -> None:
        """``memo``: evaluations already known (e.g. restored after a restart)."""
        _check_accept(accept)
        self._evaluate = evaluate
        self._accept = accept
        self._ranked: list[Candidate] = []
        self._steps: dict[str, _Step] = {}
        self._decisions: dict[str, Decision] = {}
        self._memo: dict[_Key, float] = dict(memo or {})
        self.n_evaluations = 0  # ingredient sets scored for Recipe 1 (memo hits excluded)
        self.memo_hits = 0

    # ------------------------------------------------------------ views

    @property
    def accept(self) -> str:
        return self._accept

    @property
    def memo(self) -> dict[_Key, float]:
        """Every evaluation so far, keyed by the ingredients' ``(trial_id, content_hash)``."""
        return dict(self._memo)

    @property
    def candidates(self) -> list[Candidate]:
        """Every candidate received (latest version per trial), in rank order."""
        return list(self._ranked)

    @property
    def decisions(self) -> list[Decision]:
        """The current decision for every candidate, in rank order."""
        return [self._decisions[c.trial_id] for c in self._ranked]

    @property
    def ingredients(self) -> list[str]:
        """Accepted trial ids, in rank order."""
        return [c.trial_id for c in self._ranked if self._decisions[c.trial_id].accepted]

    @property
    def soup_id_val_acc(self) -> float:
        """ID-val accuracy of the current soup; NaN while no candidate has arrived."""
        if not self._ranked:
            return math.nan
        return self._decisions[self._ranked[-1].trial_id].soup_id_val_acc

    def __len__(self) -> int:
        return len(self._ranked)

    # ------------------------------------------------------------ updates

    def add(self, c: Candidate) -> list[Decision]:
        """Offer a candidate; returns the decisions made or re-made, in rank order.

        Re-adding an identical candidate (same id, hash and accuracy) is a no-op. A changed
        hash or accuracy replaces the old version. Decisions whose outcome stands but whose
        rank moved are renumbered in ``decisions`` but not returned. If ``evaluate`` raises,
        the soup is left as it was before the call (memoised evaluations are kept).
        """
        return self.add_many([c])

    def add_many(self, candidates: Iterable[Candidate]) -> list[Decision]:
        """``add`` for several candidates at once (a later duplicate id replaces an earlier
        one): all are placed by rank first, then the ranks below the best changed one are
        decided once, so a rank is never decided twice in one call. The result equals
        adding them one by one, in any order (Recipe 1 is a function of the set)."""
        batch: dict[str, Candidate] = {}
        for c in candidates:
            _check_candidate(c)
            batch[c.trial_id] = c
        index = {x.trial_id: x for x in self._ranked}
        new = [c for c in batch.values() if index.get(c.trial_id) != c]
        if not new:
            return []
        saved = (list(self._ranked), dict(self._steps), dict(self._decisions))
        changed: dict[str, Decision] = {}
        try:
            start = len(self._ranked)
            for c in new:
                old = index.get(c.trial_id)
                if old is not None:  # the old version's decision goes; those below follow
                    position = self._ranked.index(old)
                    del self._ranked[position], self._steps[old.trial_id]
                    del self._decisions[old.trial_id]
                    start = min(start, position)
            for c in new:
                position = self._insert_position(c)
                self._ranked.insert(position, c)
                start = min(start, position)
            changed.update(self._redecide(start))
        except BaseException:
            self._ranked, self._steps, self._decisions = saved
            raise
        current = (self._decisions[trial_id] for trial_id in changed)  # ranks may have moved
        return sorted(current, key=lambda d: d.rank)

    def _insert_position(self, c: Candidate) -> int:
        key = rank_key(c)
        lo, hi = 0, len(self._ranked)
        while lo < hi:
            mid = (lo + hi) // 2
            if rank_key(self._ranked[mid]) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _redecide(self, start: int) -> dict[str, Decision]:
        """Walk down from ``start``, deciding again each candidate that does not see the
        same soup as last time (a newcomer: its first decision). A candidate that does
        keeps its decision, only renumbered: it depends on an unchanged prefix. The walk
        costs no evaluation where nothing changed, so it always goes to the end (a batch
        may have changed several places)."""
        changed: dict[str, Decision] = {}
        if start == 0:
            soup: _Key = frozenset()
            soup_acc: float | None = None
        else:
            previous = self._steps[self._ranked[start - 1].trial_id]
            soup, soup_acc = previous.after, previous.after_acc
        for rank in range(start, len(self._ranked)):
            c = self._ranked[rank]
            step = self._steps.get(c.trial_id)
            if step is not None and step.before == soup and step.before_acc == soup_acc:
                decision = self._decisions[c.trial_id]
                if decision.rank != rank:  # never mutate a Decision already handed out
                    self._decisions[c.trial_id] = replace(decision, rank=rank)
            else:
                step = self._decide(c, soup, soup_acc)
                self._steps[c.trial_id] = step
                accepted = step.after != step.before
                decision = Decision(
                    c.trial_id, rank, c.id_val_acc, accepted, len(step.after), step.after_acc
                )
                self._decisions[c.trial_id] = changed[c.trial_id] = decision
            soup, soup_acc = step.after, step.after_acc
        return changed

    def _decide(self, c: Candidate, soup: _Key, soup_acc: float | None) -> _Step:
        item = (c.trial_id, c.content_hash)
        if soup_acc is None:
            return _Step(soup, None, frozenset({item}), c.id_val_acc)
        trial = soup | {item}
        acc = self._lookup(trial)
        if better(acc, soup_acc, self._accept):
            return _Step(soup, soup_acc, trial, acc)
        return _Step(soup, soup_acc, soup, soup_acc)

    def _lookup(self, key: _Key) -> float:
        if key in self._memo:
            self.memo_hits += 1
            return self._memo[key]
        self.n_evaluations += 1
        acc = _evaluate_checked(self._evaluate, frozenset(trial_id for trial_id, _ in key))
        self._memo[key] = acc
        return acc
