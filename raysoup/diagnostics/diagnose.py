"""``raysoup diagnose``: why a soup works, measured on a sweep's own checkpoints.

Per soup group (dataset, test env, trial seed, init), each *part* is one Parquet part of
the ``diagnostics`` dataset (``results/diagnostics/part-<group>-<part>.parquet``):

- ``init_to_trial``: accuracy and loss along ``(1 - a) * theta_0 + a * theta_i`` for every
  finished trial ``i``, ``theta_0`` its own init (pretrained, auxiliary or fused featurizer
  plus its LP head), rebuilt exactly as the trainer built it (``build_model`` with the
  run's seed, on the CPU);
- ``trial_to_trial``: between every pair of the ``pair_trials`` best trials (by ID-val),
  the better-ranked one at ``a = 0``: its ``a = 0.5`` point is the pair's uniform soup;
- ``soup_to_ingredient``: from the group's uniform and greedy soup checkpoints to each of
  their ingredients;
- ``angle``: for every pair of the ``pair_trials`` best, the angle between their deltas
  ``theta_i - theta_0i`` and the gain of their average over the mean of the two
  (model soups' Figure 3);
- ``landscape`` (``landscape=True``): the plane through the best trial's ``theta_0``, the
  best trial and the second, on a ``grid`` x ``grid`` lattice (Garipov's basis).

Memory: the two ends of one segment (or the three models of the plane), the point between
them, one network and its evaluation batches, whatever the size of the group; the inits
are rebuilt once and wait on a scratch disk. Each part records a ``signature`` (the
options it used, the trials' and soups' content hashes): a rerun skips every part whose
signature is unchanged, and rewrites the others in place. Diagnose only reads the
sweep's checkpoints and writes its own parts, so it takes no lease and can run while the
sweep does (the parts then cover the trials finished so far).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from raysoup.contract import DIAGNOSTICS
from raysoup.devices import resolve_device
from raysoup.diagnostics import geometry
from raysoup.io import storage
from raysoup.io.checkpoint import load_checkpoint, load_file
from raysoup.io.layout import SweepLayout
from raysoup.io.storage import Location
from raysoup.options import OptionsError, option
from raysoup.soup.evaluator import DataKey, GroupData, SoupEvaluator
from raysoup.soup.greedy import rank_key
from raysoup.soup.group import GroupKey, Offer

State = dict[str, torch.Tensor]
Scores = dict[str, float]


@dataclass
class DiagnoseOptions:
    """What ``raysoup diagnose`` computes (every field is a ``--flag``)."""

    group: list[str] = option(
        [],
        help="group slugs to diagnose, e.g. NuisanceMNIST-e2-s0-fusing "
        "(default: every group with a finished trial)",
    )
    points: int = option(
        11, help="points per interpolation segment, ends included (101: as Seq-to-Final draws)"
    )
    pair_trials: int = option(
        4,
        help="the K best trials of a group whose pairs are "
        "interpolated and whose angles are measured",
    )
    landscape: bool = option(
        False, help="also the accuracy plane through theta_0 and the two best trials"
    )
    grid: int = option(7, help="landscape points per axis")
    device: str = option("auto", help="'auto' (CUDA when present), 'cpu', 'cuda', ...")

    def validate(self) -> None:
        if not isinstance(self.points, int) or self.points < 2:
            raise OptionsError(f"points={self.points!r}: expected an integer >= 2 (both ends)")
        if not isinstance(self.pair_trials, int) or self.pair_trials < 2:
            raise OptionsError(f"pair_trials={self.pair_trials!r}: expected an integer >= 2")
        if not isinstance(self.grid, int) or self.grid < 2:
            raise OptionsError(f"grid={self.grid!r}: expected an integer >= 2 per axis")
        resolve_device(self.device)  # a bad or missing device, before any work

    def coefficients(self) -> list[float]:
        """``points`` values of ``a`` from 0 to 1; exact 0, 0.5 (odd counts) and 1."""
        n = self.points - 1
        return [i / n for i in range(n + 1)]


@dataclass(frozen=True)
class TrialInput:
    """One finished trial: its offer (id, checkpoint, ID-val, hash) and how to rebuild its
    init (``None``: no init known, e.g. outside a sweep)."""

    offer: Offer
    init: Callable[[], State] | None = None


@dataclass(frozen=True)
class SoupInput:
    method: str
    checkpoint: Location
    content_hash: str
    ingredients: tuple[str, ...]


@dataclass
class GroupInputs:
    """Everything one group's diagnosis reads."""

    key: GroupKey
    trials: list[TrialInput]  # ranked best first
    soups: list[SoupInput]
    data: Callable[[], GroupData]
    sweep: str


def _load(location: Location) -> State:
    state, _ = load_checkpoint(storage.local_checkpoint(location))
    return state


class InitCache:
    """Each trial's init built once, then kept on a scratch disk (never all in memory)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._paths: dict[str, Path] = {}

    def get(self, trial: TrialInput) -> State:
        from safetensors.torch import save_file

        trial_id = trial.offer.trial_id
        if trial_id not in self._paths:
            if trial.init is None:
                raise ValueError(f"trial {trial_id!r}: its init cannot be rebuilt")
            path = self.folder / f"init-{len(self._paths)}.safetensors"
            save_file({k: v.contiguous() for k, v in trial.init().items()}, str(path))
            self._paths[trial_id] = path
        return load_file(str(self._paths[trial_id]))


def _signature(part: str, options: DiagnoseOptions, inputs: GroupInputs) -> str:
    used = {
        "init_to_trial": ("points",),
        "trial_to_trial": ("points", "pair_trials"),
        "soup_to_ingredient": ("points",),
        "angle": ("pair_trials",),
        "landscape": ("grid", "pair_trials"),
    }[part]
    payload = {
        "part": part,
        "options": {name: getattr(options, name) for name in used},
        "trials": [(t.offer.trial_id, t.offer.content_hash) for t in inputs.trials],
        "soups": [(s.method, s.content_hash) for s in inputs.soups],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class GroupDiagnosis:
    """The diagnostics of one group, part by part (``rows(part)``)."""

    def __init__(self, inputs: GroupInputs, options: DiagnoseOptions, scratch: Path) -> None:
        self.inputs = inputs
        self.options = options
        self.device = resolve_device(options.device)
        self.inits = InitCache(scratch)
        self._evaluator: SoupEvaluator | None = None
        self._memo: dict[tuple[Any, ...], Scores] = {}  # the same model is scored once
        self.n_scored = 0

    @property
    def evaluator(self) -> SoupEvaluator:
        if self._evaluator is None:
            first = self.inputs.trials[0].offer.checkpoint
            self._evaluator = SoupEvaluator(
                self.inputs.data(), storage.read_meta(first), self.device
            )
        return self._evaluator

    def _score(self, state: Mapping[str, torch.Tensor]) -> Scores:
        self.n_scored += 1
        return self.evaluator.scores(state)

    def _score_at(self, start: tuple[str, State], end: tuple[str, State], a: float) -> Scores:
        """The scores of the point ``a`` between two named models (names are unique in a
        group: trial ids, ``init:<trial>``, ``soup:<method>``), each model scored once."""
        key: tuple[Any, ...] = (
            (start[0],) if a == 0.0 else (end[0],) if a == 1.0 else (start[0], end[0], a)
        )
        if key not in self._memo:
            self._memo[key] = self._score(geometry.interpolate(start[1], end[1], a))
        return self._memo[key]

    def _base_row(self, diagnostic: str, start: str, end: str) -> dict[str, Any]:
        key = self.inputs.key
        return {
            "sweep": self.inputs.sweep,
            "diagnostic": diagnostic,
            "dataset": key.dataset,
            "test_env": key.test_env,
            "trial_seed": key.trial_seed,
            "init": key.init,
            "start": start,
            "end": end,
        }

    def _segment(
        self, diagnostic: str, start: tuple[str, State], end: tuple[str, State]
    ) -> Iterator[dict[str, Any]]:
        (start_name, first), (end_name, last) = start, end
        start = (start_name, {k: v.to(self.device) for k, v in first.items()})
        end = (end_name, {k: v.to(self.device) for k, v in last.items()})
        for point, a in enumerate(self.options.coefficients()):
            yield {
                **self._base_row(diagnostic, start_name, end_name),
                "point": point,
                "a": a,
                **self._score_at(start, end, a),
            }

    def _best(self) -> list[TrialInput]:
        return self.inputs.trials[: self.options.pair_trials]

    def rows(self, part: str) -> list[dict[str, Any]]:
        return list(getattr(self, f"_{part}")())

    def _init_to_trial(self) -> Iterator[dict[str, Any]]:
        for trial in self.inputs.trials:
            if trial.init is None:
                continue
            offer = trial.offer
            yield from self._segment(
                "init_to_trial",
                (f"init:{offer.trial_id}", self.inits.get(trial)),
                (offer.trial_id, _load(offer.checkpoint)),
            )

    def _trial_to_trial(self) -> Iterator[dict[str, Any]]:
        for left, right in itertools.combinations(self._best(), 2):
            yield from self._segment(
                "trial_to_trial",
                (left.offer.trial_id, _load(left.offer.checkpoint)),
                (right.offer.trial_id, _load(right.offer.checkpoint)),
            )

    def _soup_to_ingredient(self) -> Iterator[dict[str, Any]]:
        by_id = {t.offer.trial_id: t for t in self.inputs.trials}
        for soup in self.inputs.soups:
            state = _load(soup.checkpoint)
            for trial_id in soup.ingredients:
                if trial_id in by_id:
                    yield from self._segment(
                        "soup_to_ingredient",
                        (f"soup:{soup.method}", state),
                        (trial_id, _load(by_id[trial_id].offer.checkpoint)),
                    )

    def _angle(self) -> Iterator[dict[str, Any]]:
        best = [t for t in self._best() if t.init is not None]
        for left, right in itertools.combinations(best, 2):
            first = (left.offer.trial_id, _load(left.offer.checkpoint))
            second = (right.offer.trial_id, _load(right.offer.checkpoint))
            angle = geometry.angle_degrees(
                geometry.delta(first[1], self.inits.get(left)),
                geometry.delta(second[1], self.inits.get(right)),
            )
            ends = (self._score_at(first, second, 0.0), self._score_at(first, second, 1.0))
            middle = self._score_at(first, second, 0.5)
            row = {
                **self._base_row("angle", left.offer.trial_id, right.offer.trial_id),
                "a": 0.5,
                **middle,
                "angle_deg": angle,
            }
            for split, column in (("id_val", "gain_id_val"), ("test", "gain_test")):
                row[column] = (
                    middle[f"{split}_acc"] - (ends[0][f"{split}_acc"] + ends[1][f"{split}_acc"]) / 2
                )
            yield row

    def _landscape(self) -> Iterator[dict[str, Any]]:
        best = self._best()
        if len(best) < 2 or best[0].init is None:
            return
        origin = self.inits.get(best[0])
        first, second = _load(best[0].offer.checkpoint), _load(best[1].offer.checkpoint)
        try:
            plane = geometry.plane_through(origin, first, second)
        except ValueError:
            return  # the models are on one line: no plane to draw
        del first, second
        xs, ys = geometry.plane_grid(plane, self.options.grid)
        start = f"init:{best[0].offer.trial_id}"
        end = f"{best[0].offer.trial_id}|{best[1].offer.trial_id}"
        marks = {"theta_0": plane.points[0], "theta_1": plane.points[1], "theta_2": plane.points[2]}
        point = 0
        for y in ys:
            for x in xs:
                scores = self._score(plane.at(origin, x, y))
                yield {
                    **self._base_row("landscape", start, end),
                    "point": point,
                    "a": x,
                    "b": y,
                    **scores,
                }
                point += 1
        for point_name, (x, y) in marks.items():  # the three models, to mark on the plot
            yield {
                **self._base_row("landscape", start, end),
                "point": -1,
                "a": x,
                "b": y,
                "label": point_name,
                **self._score(plane.at(origin, x, y)),
            }

    def parts(self) -> list[str]:
        names = ["init_to_trial", "trial_to_trial", "soup_to_ingredient", "angle"]
        return names + (["landscape"] if self.options.landscape else [])


def part_key(key: GroupKey, part: str) -> str:
    return f"{key.slug}-{part}".replace("_", "-")


def diagnose_group(
    inputs: GroupInputs,
    options: DiagnoseOptions,
    write: Callable[[str, list[dict[str, Any]]], None],
    done: Mapping[str, str],
    log: Callable[[str], None] = lambda line: None,
) -> int:
    """Compute and ``write(part_key, rows)`` every part of one group whose signature is not
    in ``done`` (part key -> signature). Returns the number of parts written."""
    written = 0
    with tempfile.TemporaryDirectory(prefix="raysoup-diagnose-") as scratch:
        diagnosis = GroupDiagnosis(inputs, options, Path(scratch))
        for part in diagnosis.parts():
            name = part_key(inputs.key, part)
            signature = _signature(part, options, inputs)
            if done.get(name) == signature:
                log(f"diagnose: {inputs.key.slug} {part}: up to date")
                continue
            began, scored = time.perf_counter(), diagnosis.n_scored
            rows = diagnosis.rows(part)
            for row in rows:
                row["part"], row["signature"] = name, signature
            write(name, rows)
            written += 1
            log(
                f"diagnose: {inputs.key.slug} {part}: {len(rows)} rows, "
                f"{diagnosis.n_scored - scored} evaluations, {time.perf_counter() - began:.1f}s"
            )
    return written


# ---------------------------------------------------------------- a sweep's groups


def _init_builder(spec: Mapping[str, Any]) -> Callable[[], State]:
    def build() -> State:
        from raysoup.options import from_mapping
        from raysoup.training.trainer import RunSpec, build_model, resolve_settings, run_seed

        run = dataclasses.replace(from_mapping(RunSpec, spec, "diagnose"), device="cpu")
        settings = resolve_settings(run)
        network, _, _ = build_model(run, settings, run_seed(run))
        return {k: v.detach().clone() for k, v in network.state_dict().items()}

    return build


def sweep_groups(root: Location, soups: pd.DataFrame) -> list[GroupInputs]:
    """The groups of the sweep at ``root`` that have a finished trial, with their ranked
    trials, init builders and soup checkpoints (uniform and greedy)."""
    from raysoup.sweep.plan import plan_sweep
    from raysoup.sweep.record import read_config

    config = read_config(root)
    runs = plan_sweep(config, root).get("target", [])
    trials: dict[GroupKey, list[TrialInput]] = {}
    for run in runs:
        if storage.is_checkpoint(run.spec["out"]):
            offer = Offer.from_checkpoint(run.key, run.spec["out"])
            trials.setdefault(offer.group, []).append(TrialInput(offer, _init_builder(run.spec)))
    groups = []
    for key in sorted(trials):
        ranked = sorted(trials[key], key=lambda t: rank_key(t.offer.candidate))
        group_soups = []
        if not soups.empty:
            mine = soups[
                (soups.dataset == key.dataset)
                & (soups.test_env == key.test_env)
                & (soups.trial_seed == key.trial_seed)
                & (soups.init == key.init)
                & soups.method.isin(["uniform", "greedy"])
                & soups.checkpoint.notna()
            ]
            for row in mine.sort_values("method").itertuples():
                if storage.is_checkpoint(row.checkpoint):
                    meta = storage.read_meta(row.checkpoint)
                    group_soups.append(
                        SoupInput(
                            row.method, row.checkpoint, meta.content_hash, tuple(row.ingredients)
                        )
                    )
        data_key = DataKey.of(storage.read_meta(ranked[0].offer.checkpoint))
        groups.append(
            GroupInputs(
                key,
                ranked,
                group_soups,
                data=lambda k=data_key: GroupData(k, config.data_dir, config.holdout_fraction),
                sweep=config.name,
            )
        )
    return groups


def diagnose(
    root: Location,
    options: DiagnoseOptions | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> pd.DataFrame:
    """Diagnose the sweep at ``root`` (``<storage>/<name>``); returns the whole
    ``diagnostics`` dataset as it stands after the run."""
    from raysoup.results.store import ResultsStore, load_results

    options = options or DiagnoseOptions()
    options.validate()
    root = storage.resolve(root)
    store = ResultsStore(SweepLayout(root).results)
    for moved in store.set_aside_damaged([DIAGNOSTICS]):  # diagnose's own parts: recomputed
        log(f"diagnose: set aside damaged {moved}")
    results = load_results(root)
    groups = sweep_groups(root, results["soups"])
    if not groups:
        raise FileNotFoundError(f"{root}: no finished target trial to diagnose")
    known = {g.key.slug for g in groups}
    unknown = sorted(set(options.group) - known)
    if unknown:
        raise OptionsError(
            f"group {unknown}: not a group of this sweep with a finished trial; "
            f"expected one of {sorted(known)}"
        )
    existing = results.get(DIAGNOSTICS, pd.DataFrame())
    done: dict[str, str] = {}
    if not existing.empty and {"part", "signature"} <= set(existing):
        done = dict(
            existing.drop_duplicates("part")[["part", "signature"]].itertuples(
                index=False, name=None
            )
        )

    def write(name: str, rows: list[dict[str, Any]]) -> None:
        store.append(DIAGNOSTICS, rows, part_key=name)

    for inputs in groups:
        if options.group and inputs.key.slug not in options.group:
            continue
        diagnose_group(inputs, options, write, done, log)
    return store.read(DIAGNOSTICS)
