"""Every group's soups of one sweep, persisted so that a restart loses nothing.

``SoupMaker`` is what the soup actor runs (and what ``raysoup soup`` runs post hoc,
without Ray). Per group (dataset, test env, trial seed, init):

- ``offer`` adds finished trials (idempotent by trial id and content hash), keeps the
  exact Recipe-1 greedy soup of the trials so far, rewrites the group's ``soup_steps``
  part and, once every planned trial of the group has arrived, finalizes it.
- ``finalize`` writes the ``erm``, ``uniform``, ``greedy`` and ``ensemble`` rows of
  ``soups`` (one part per method and group) and the uniform and greedy soup checkpoints
  under ``<root>/checkpoints/soup/<method>/<group>/``; ``erm`` points at the best trial's own
  checkpoint, ``ensemble`` (the logit average of the group's trials) has none.
- ``finalize_all_seeds`` writes ``uniform_all`` (DiWA's uniform†): one uniform soup of
  every trial of every trial seed of a (dataset, test env, init), ``trial_seed = -1``,
  once every planned group of it is complete (post hoc: from whatever groups there are).
  Its trials were trained on different splits, so no split is ID-val for all of them
  (each seed's ``out`` images are other seeds' training images): its ``id_val_acc`` is
  NaN, as the reference, which reports test accuracy alone for it.
- State (offers, memoised evaluations, decision times, what was finalized) is written
  atomically to ``<root>/soup_state.json`` after every change. A restarted maker reads
  it and rebuilds every group from the memo without a single evaluation, so decisions
  are neither lost nor duplicated, and results are rewritten under the same part keys.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from raysoup.devices import resolve_device
from raysoup.errors import BadInputError
from raysoup.io import storage
from raysoup.io.checkpoint import CheckpointError, save_checkpoint
from raysoup.io.layout import SweepLayout
from raysoup.io.storage import Location
from raysoup.results.schema import ALL_SEEDS, ALL_SEEDS_METHODS, METHODS
from raysoup.results.store import ResultsStore
from raysoup.soup.average import RunningSoup
from raysoup.soup.backend import Evaluator, RaysoupBackend, SoupBackend
from raysoup.soup.greedy import ACCEPT, Decision, rank_key
from raysoup.soup.group import (
    GroupKey,
    GroupSoup,
    Item,
    Offer,
    StaleCheckpointError,
    StateCache,
)

# One row per group for GROUP_METHODS; per (dataset, test env, init) for uniform_all.
GROUP_METHODS = tuple(m for m in METHODS if m not in ALL_SEEDS_METHODS)
STATE_VERSION = 1


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def describe(row: Mapping[str, Any]) -> str:
    """One line for a ``soups`` row (what ``raysoup run`` and ``raysoup soup`` print)."""
    seed = "all" if row["trial_seed"] == ALL_SEEDS else row["trial_seed"]
    return (
        f"{row['method']:<11} {row['init']:<12} env {row['test_env']} seed {seed}: "
        f"{row['n_ingredients']} ingredient(s), id_val {row['id_val_acc']:.4f}, "
        f"test {row['test_acc']:.4f}"
    )


def _signature(accept: str, method: str, items: Sequence[Item]) -> str:
    text = json.dumps([method, accept, sorted(items)])
    return hashlib.sha256(text.encode()).hexdigest()


class SoupMaker:
    """The soups of one sweep; ``expected`` lists each group's planned trial ids."""

    def __init__(
        self,
        root: Location,
        sweep: str,
        *,
        accept: str = "ge",
        expected: Mapping[GroupKey, Iterable[str]] | None = None,
        data_dir: str | Path | None = None,
        holdout_fraction: float = 0.2,
        device: str = "auto",
        max_models: int = 2,
        logit_cache_mb: float = 256.0,
        methods: Sequence[str] = METHODS,
        persist: bool = True,
        log: Callable[[str], None] | None = None,
        backend: SoupBackend | None = None,
    ) -> None:
        if accept not in ACCEPT:
            raise ValueError(f"accept={accept!r}: expected one of {ACCEPT}")
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise ValueError(f"methods={list(methods)}: expected a subset of {METHODS}")
        if max_models < 0:
            raise ValueError(f"max_models={max_models}: expected >= 0")
        self.root = storage.resolve(root)
        self.sweep = sweep
        self.accept = accept
        self.expected = {key: set(ids) for key, ids in (expected or {}).items()}
        self.device = resolve_device(device)
        self.max_models = max_models
        self.logit_cache_bytes = int(logit_cache_mb * 2**20)
        self.methods = tuple(m for m in METHODS if m in methods)
        self.persist = persist
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.store = ResultsStore(str(SweepLayout(self.root).results))
        # how trials are read and soups scored: raysoup checkpoints on the group's own data,
        # or (``raysoup.tune``) any trainable's state dicts and the user's evaluation
        self.backend: SoupBackend = backend or RaysoupBackend(
            self.device, data_dir, holdout_fraction
        )
        self.groups: dict[GroupKey, GroupSoup] = {}
        self._decided_at: dict[GroupKey, dict[str, list[Any]]] = {}
        self._final: dict[GroupKey, dict[str, str]] = {}
        self._evaluators: dict[GroupKey, Evaluator] = {}
        # Each trial's ensemble logits, computed when it arrives (while the sweep runs)
        # rather than all at once when its group completes; bounded by logit_cache_mb.
        # (group, trial id) -> (content hash, logits per split)
        self._logits: dict[tuple[GroupKey, str], tuple[str, dict[str, torch.Tensor]]] = {}
        self.n_scorings = 0  # models scored on the evaluation data (soups, ensembles)
        self.failed: dict[str, str] = {}  # trial id -> why it could not be souped
        if persist:
            self._restore()

    # ------------------------------------------------------------ state

    @property
    def state_path(self) -> Location:
        return SweepLayout(self.root).soup_state

    def _save(self) -> None:
        if not self.persist:
            return
        groups = []
        for key, group in sorted(self.groups.items()):
            groups.append(
                {
                    "key": asdict(key),
                    "offers": [o.to_dict() for o in group.offers.values()],
                    "memo": [[sorted(items), acc] for items, acc in group.memo.items()],
                    "decided_at": self._decided_at.get(key, {}),
                    "final": self._final.get(key, {}),
                }
            )
        state = {"version": STATE_VERSION, "sweep": self.sweep, "accept": self.accept}
        state["groups"] = groups
        state["all_seeds"] = [
            {"key": asdict(key), "final": final}
            for key, final in sorted(self._final.items())
            if key.trial_seed == ALL_SEEDS
        ]
        storage.write_bytes_atomic(self.state_path, json.dumps(state, indent=1).encode())

    def _restore(self) -> None:
        if not storage.exists(self.state_path):
            return
        state = json.loads(storage.read_bytes(self.state_path))
        if state.get("version") != STATE_VERSION:
            raise BadInputError(
                f"{self.state_path}: soup state version {state.get('version')!r}, this raysoup "
                f"reads version {STATE_VERSION}; use the raysoup that wrote it, or delete the "
                f"file and run `raysoup soup` to rebuild the soups from the checkpoints"
            )
        if state.get("accept") != self.accept:
            raise BadInputError(
                f"{self.state_path}: soups were built with accept={state.get('accept')!r}, "
                f"not {self.accept!r}; use the sweep's setting"
            )
        for record in state["groups"]:
            key = GroupKey(**record["key"])
            memo = {frozenset(tuple(i) for i in items): acc for items, acc in record["memo"]}
            group = self._new_group(key, memo)
            # In rank order each trial is decided once, against the soup above it: exactly
            # the sets the final decisions were made on, all memoised, so no evaluation.
            offers = sorted(
                (Offer.from_dict(data) for data in record["offers"]),
                key=lambda o: rank_key(o.candidate),
            )
            for offer in offers:
                group.offer(offer)
            self._decided_at[key] = record["decided_at"]
            self._final[key] = record["final"]
        for record in state.get("all_seeds", []):
            self._final[GroupKey(**record["key"])] = record["final"]
        restored = sum(len(g.offers) for g in self.groups.values())
        self.log(f"raysoup soup: restored {restored} trials in {len(self.groups)} groups")
        for key in self.groups:
            self._write_steps(key)

    # ------------------------------------------------------------ evaluation

    def evaluator(self, key: GroupKey) -> Evaluator:
        if key not in self._evaluators:
            first = self.groups[key].ranked()[0]
            self._evaluators[key] = self.backend.evaluator(key, first)
        return self._evaluators[key]

    def _new_group(self, key: GroupKey, memo: Mapping[frozenset[Item], float] | None) -> GroupSoup:
        def score(state: Mapping[str, torch.Tensor]) -> float:
            self.n_scorings += 1
            return self.evaluator(key).id_val_acc(state)

        states = StateCache(self.max_models, self.backend.load)
        group = GroupSoup(
            key, score, accept=self.accept, states=states, memo=memo, device=self.device
        )
        self.groups[key] = group
        return group

    # ------------------------------------------------------------ offers

    def offer(self, offers: Iterable[Offer]) -> list[GroupKey]:
        """Add finished trials; returns the groups that changed. The new trials of a group
        are decided together (each rank at most once), whatever order they came in."""
        batches: dict[GroupKey, dict[str, Offer]] = {}
        for offer in offers:
            group = self.groups.get(offer.group) or self._new_group(offer.group, None)
            if group.offers.get(offer.trial_id) == offer:
                continue  # already souped: an idempotent re-delivery
            batches.setdefault(offer.group, {})[offer.trial_id] = offer
        changed: list[GroupKey] = []
        for key, batch in batches.items():
            decisions = self._offer_batch(self.groups[key], list(batch.values()))
            if decisions is None:
                continue
            stamp = _now()
            at = self._decided_at.setdefault(key, {})
            for d in decisions:
                at[d.trial_id] = [d.accepted, d.soup_size, d.soup_id_val_acc, stamp]
            changed.append(key)
            self._keep_logits(self.groups[key], batch)
        if changed:
            self._save()
        for key in changed:
            self._write_steps(key)
            self._status(key)
            if self._complete(key):
                self.finalize(key)
        for all_seeds in dict.fromkeys(key.all_seeds for key in changed):
            if self._all_seeds_complete(all_seeds):
                self.finalize_all_seeds(all_seeds)
        return changed

    def _keep_logits(self, group: GroupSoup, batch: Mapping[str, Offer]) -> None:
        """Compute and keep the ensemble logits of the batch's trials that joined the
        group, while the budget lasts (the rest are computed when the group completes)."""
        if "ensemble" not in self.methods:
            return
        for trial_id in batch:
            offer = group.offers.get(trial_id)
            if offer is None or offer.trial_id in self.failed:
                continue
            self._logits.pop((group.key, trial_id), None)  # an earlier version of the trial
            used = sum(t.nbytes for _, logits in self._logits.values() for t in logits.values())
            if used >= self.logit_cache_bytes:
                return
            try:
                logits = self.evaluator(group.key).trial_logits(group.states.load(offer))
            except (CheckpointError, OSError, StaleCheckpointError):
                continue  # finalize loads it again, and says what is wrong
            self._logits[(group.key, trial_id)] = (offer.content_hash, logits)

    def _ensemble_logits(self, group: GroupSoup, offer: Offer) -> dict[str, torch.Tensor]:
        content_hash, logits = self._logits.get((group.key, offer.trial_id), ("", {}))
        if logits and content_hash == offer.content_hash:
            return logits
        return self.evaluator(group.key).trial_logits(group.states.load(offer))

    def _offer_batch(self, group: GroupSoup, batch: list[Offer]) -> list[Decision] | None:
        """The batch's decisions; a trial that cannot be souped (unreadable or damaged
        checkpoint) is logged and left out, never stopping the rest. ``None``: none added."""
        try:
            decisions = self._offer_consistently(group, batch)
        except (CheckpointError, OSError) as error:
            if len(batch) == 1:
                offer = batch[0]
                self.failed[offer.trial_id] = str(error)
                self.log(f"raysoup soup: could not soup trial {offer.trial_id!r}: {error}")
                return None
            # which trial? one at a time (the group was left as it was)
            results = [self._offer_batch(group, [offer]) for offer in batch]
            if all(result is None for result in results):
                return None
            return [d for result in results if result for d in result]
        for offer in batch:
            self.failed.pop(offer.trial_id, None)
        return decisions

    def _offer_consistently(self, group: GroupSoup, batch: list[Offer]) -> list[Decision]:
        """``group.offer_many``, re-reading any checkpoint found replaced since it was
        offered (that trial's new version joins the batch)."""
        for _ in range(len(group.offers) + len(batch) + 3):
            try:
                return group.offer_many(batch)
            except StaleCheckpointError as stale:
                fresh = self.backend.offer(stale.offer.trial_id, stale.offer.checkpoint)
                self.log(f"raysoup soup: {stale}; re-offering the new version")
                batch = [o for o in batch if o.trial_id != fresh.trial_id] + [fresh]
        raise RuntimeError(f"checkpoints of {group.key.slug} keep changing; is a trial running?")

    def refresh(self, key: GroupKey) -> None:
        """Re-offer every trial whose checkpoint's content hash changed since its offer."""
        group = self.groups[key]
        stale = [
            o
            for o in list(group.offers.values())
            if self.backend.content_hash(o.checkpoint) not in (None, o.content_hash)
        ]
        if stale:
            self.log(f"raysoup soup: {key.slug}: {len(stale)} checkpoint(s) changed; re-souping")
            self.offer([self.backend.offer(o.trial_id, o.checkpoint) for o in stale])

    def _complete(self, key: GroupKey) -> bool:
        expected = self.expected.get(key)
        return bool(expected) and key in self.groups and expected <= set(self.groups[key].offers)

    def _members(self, all_seeds: GroupKey) -> list[GroupKey]:
        """The groups (one per trial seed) whose trials ``all_seeds`` soups, by seed."""
        return [k for k in sorted(self.groups) if k.all_seeds == all_seeds]

    def _all_seeds_complete(self, all_seeds: GroupKey) -> bool:
        planned = [key for key in self.expected if key.all_seeds == all_seeds]
        return bool(planned) and all(self._complete(key) for key in planned)

    # ------------------------------------------------------------ outputs

    def steps_rows(self, key: GroupKey) -> list[dict[str, Any]]:
        group = self.groups[key]
        at = self._decided_at.get(key, {})
        rows = []
        for d in group.greedy.decisions:
            stamp = at.get(d.trial_id, [None] * 4)[3] or _now()
            rows.append(
                {
                    "sweep": self.sweep,
                    "method": "greedy",
                    "trial_id": d.trial_id,
                    "rank": d.rank,
                    "candidate_id_val_acc": d.candidate_id_val_acc,
                    "accepted": d.accepted,
                    "soup_size": d.soup_size,
                    "soup_id_val_acc": d.soup_id_val_acc,
                    "decided_at": stamp,
                    **asdict(key),
                    "accept": self.accept,
                }
            )
        return rows

    def _write_steps(self, key: GroupKey) -> None:
        if "greedy" in self.methods:
            self.store.append("soup_steps", self.steps_rows(key), part_key=f"greedy-{key.slug}")

    def _status(self, key: GroupKey) -> None:
        group = self.groups[key]
        expected = len(self.expected.get(key, ())) or "?"
        self.log(
            f"raysoup soup: {key.slug}: {len(group.offers)}/{expected} trials, greedy "
            f"{len(group.greedy.ingredients)} ingredient(s), id_val "
            f"{group.greedy.soup_id_val_acc:.4f} ({group.greedy.n_evaluations} evaluations, "
            f"{group.greedy.memo_hits} memo hits, {group.states.n_loads} loads)"
        )

    def soup_dir(self, method: str, key: GroupKey) -> Location:
        return SweepLayout(self.root).soup_checkpoint(method, key.slug)

    def finalize(self, key: GroupKey) -> list[dict[str, Any]]:
        """Write this group's soups (rows and checkpoints) unless already written as is."""
        self.refresh(key)
        group = self.groups[key]
        rows = []
        for method in (m for m in self.methods if m in GROUP_METHODS):
            ingredients = self._ingredients(group, method)
            items = [(t, group.offers[t].content_hash) for t in ingredients]
            signature = _signature(self.accept, method, items)
            done = self._final.setdefault(key, {}).get(method) == signature
            if done and self.store.has_part("soups", f"{method}-{key.slug}"):
                continue
            row = self._make(group, method, ingredients)
            self.store.append("soups", [row], part_key=f"{method}-{key.slug}")
            self._final[key][method] = signature
            self._save()
            rows.append(row)
            self.log(f"raysoup soup: {describe(row)}")
        group.release()
        for cached in [k for k in self._logits if k[0] == key]:
            del self._logits[cached]
        return rows

    def finalize_all(self) -> list[dict[str, Any]]:
        """Finalize every group that has trials (an incomplete one is said so), then the
        ``uniform_all`` soup of each (dataset, test env, init) over the groups there are."""
        for key in sorted(self.groups):
            missing = sorted(self.expected.get(key, set()) - set(self.groups[key].offers))
            if missing:
                self.log(
                    f"raysoup soup: {key.slug}: soups of {len(self.groups[key].offers)} trials; "
                    f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                )
        rows = [row for key in sorted(self.groups) for row in self.finalize(key)]
        for all_seeds in dict.fromkeys(key.all_seeds for key in sorted(self.groups)):
            rows += self.finalize_all_seeds(all_seeds)
        return rows

    def finalize_all_seeds(self, all_seeds: GroupKey) -> list[dict[str, Any]]:
        """Write the ``uniform_all`` soup (row and checkpoint) of every trial of every
        trial seed of ``all_seeds`` = (dataset, test env, -1, init), unless already written
        as is. The trials are summed in (trial seed, rank) order, one model at a time."""
        if "uniform_all" not in self.methods:
            return []
        for key in self._members(all_seeds):
            self.refresh(key)  # a replaced checkpoint is re-offered before it is averaged
        members = [self.groups[key] for key in self._members(all_seeds)]
        offers = [offer for group in members for offer in group.ranked()]
        if not offers:
            return []
        items = [(o.trial_id, o.content_hash) for o in offers]
        signature = _signature(self.accept, "uniform_all", items)
        part = f"uniform_all-{all_seeds.slug}"
        done = self._final.get(all_seeds, {}).get("uniform_all") == signature
        if done and self.store.has_part("soups", part):
            return []
        total = RunningSoup()
        for group in members:
            for offer in group.ranked():
                total.add(group.states.load(offer))
            group.release()  # one group's cache at a time
        state = total.average()
        test = self.evaluator(members[0].key).test_acc(state)  # the same env for every seed
        self.n_scorings += 1
        ingredients = [o.trial_id for o in offers]
        meta = self.backend.soup_meta(
            all_seeds, "uniform_all", members[0].erm(), ingredients, {"test_acc": test}
        )
        checkpoint = str(self.soup_dir("uniform_all", all_seeds))
        with storage.checkpoint_output(checkpoint) as local:
            save_checkpoint(local, state, meta)
        row = self._row("uniform_all", all_seeds, ingredients, math.nan, test, checkpoint)
        self.store.append("soups", [row], part_key=part)
        self._final.setdefault(all_seeds, {})["uniform_all"] = signature
        self._save()
        self.log(f"raysoup soup: {describe(row)}")
        return [row]

    def _ingredients(self, group: GroupSoup, method: str) -> list[str]:
        if method == "erm":
            return [group.erm().trial_id]
        if method == "greedy":
            return group.greedy.ingredients
        return [o.trial_id for o in group.ranked()]

    def _make(self, group: GroupSoup, method: str, ingredients: list[str]) -> dict[str, Any]:
        key = group.key
        checkpoint: str | None
        if method == "erm":
            best = group.erm()
            id_val, test, checkpoint = best.id_val_acc, best.test_acc, best.checkpoint
            if math.isnan(test):
                test = self.evaluator(key).test_acc(group.states.load(best))
        elif method == "ensemble":  # rank order: the same sums whatever the arrival order
            ranked = group.ranked()
            logits = (self._ensemble_logits(group, o) for o in ranked)
            id_val, test = self.evaluator(key).ensemble_accs(logits)
            self.n_scorings += len(ranked)
            checkpoint = None
        else:
            if method == "greedy":
                state = group.average(ingredients)
                id_val = group.greedy.soup_id_val_acc
            else:
                state = group.uniform_average()
                id_val = self.evaluator(key).id_val_acc(state)
                self.n_scorings += 1
            test = self.evaluator(key).test_acc(state)
            metrics = {"id_val_acc": id_val, "test_acc": test}
            meta = self.backend.soup_meta(key, method, group.erm(), ingredients, metrics)
            checkpoint = str(self.soup_dir(method, key))
            with storage.checkpoint_output(checkpoint) as local:  # published if a URI
                save_checkpoint(local, state, meta)
        return self._row(method, key, ingredients, id_val, test, checkpoint)

    def _row(
        self,
        method: str,
        key: GroupKey,
        ingredients: list[str],
        id_val: float,
        test: float,
        checkpoint: str | None,
    ) -> dict[str, Any]:
        members = self._members(key) if key.trial_seed == ALL_SEEDS else [key]
        return {
            "sweep": self.sweep,
            "method": method,
            **asdict(key),
            "n_ingredients": len(ingredients),
            "ingredients": list(ingredients),
            "id_val_acc": float(id_val),
            "test_acc": float(test),
            "checkpoint": checkpoint,
            "accept": self.accept,
            "n_trials": sum(len(self.groups[k].offers) for k in members),
            "n_planned": self.n_planned(key),
        }

    def n_planned(self, key: GroupKey) -> int | None:
        """The trials planned for a group (for an all-seeds key: for all of its groups);
        ``None`` when the maker was not told (post hoc, without a plan)."""
        if key.trial_seed == ALL_SEEDS:
            planned = [ids for k, ids in self.expected.items() if k.all_seeds == key]
        else:
            planned = [self.expected[key]] if key in self.expected else []
        return sum(len(ids) for ids in planned) if planned else None

    # ------------------------------------------------------------ views

    def summary(self) -> list[dict[str, Any]]:
        """One line per group: trials, greedy size and accuracy, what is final."""
        return [
            {
                "group": key.slug,
                "trials": len(group.offers),
                "expected": len(self.expected.get(key, ())),
                "greedy": group.greedy.ingredients,
                "greedy_id_val_acc": group.greedy.soup_id_val_acc,
                "greedy_evaluations": group.greedy.n_evaluations,
                "final": sorted(self._final.get(key, {})),
            }
            for key, group in sorted(self.groups.items())
        ]
