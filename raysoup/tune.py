"""Streaming soups for *any* Ray Tune script: ``SoupCallback``, and the same soups post hoc.

A function trainable that reports an ID-val accuracy and a checkpoint holding a state
dict gets raysoup's soup actor with a few added lines::

    from raysoup.tune import SoupCallback

    soup = SoupCallback(
        storage="~/soups", name="my-sweep",
        metric="val_acc",              # the ID-val accuracy the trainable reports, in [0, 1]
        state_dict_file="model.pt",    # in each reported checkpoint (.pt/.pth/.bin/.safetensors)
        evaluate=val_accuracy,         # state dict -> that same ID-val accuracy
        evaluate_test=test_accuracy,   # optional: state dict -> test (OOD) accuracy
    )
    tuner = tune.Tuner(train_fn, ..., run_config=tune.RunConfig(callbacks=[soup]))
    tuner.fit()
    soups = soup.finalize()            # the erm / uniform / greedy rows, also in Parquet

What holds, as in ``raysoup run``:

- The exact streaming Recipe 1 (``>=`` by default, ``accept="gt"`` for model soups'),
  sorted by the reported ``metric`` of each trial's *last* report, which must carry the
  checkpoint; ``evaluate`` must compute that same number (it scores the soups).
- A named, restartable soup actor (``SoupMaker`` with a ``StateDictBackend``); its state
  is saved after every change, so a restarted actor or driver loses nothing.
- ``<storage>/<name>/results/{trials,soup_steps,soups}`` Parquet datasets and the soup
  checkpoints (``model.safetensors`` + ``raysoup.json``, with the trainable's own keys)
  under ``<storage>/<name>/checkpoints/soup/``.
- ``group_by(config) -> str`` soups trials of different groups apart (default: one group,
  named after the sweep). Weights are never unpickled: ``.pt`` files go through
  ``torch.load(weights_only=True)``.

``soup_tune_experiment(path, ...)`` builds the same soups afterwards from a finished Tune
experiment folder (no Ray needed), e.g. to compare or to re-soup with ``accept="gt"``.
Only local (or shared-filesystem) Tune storage is read; trials' checkpoints must stay
where Tune wrote them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from raysoup.contract import ACCEPT, SOUP_STAGE
from raysoup.io.checkpoint import CheckpointMeta, file_sha256, import_state_dict
from raysoup.io.layout import SweepLayout
from raysoup.io.storage import Location
from raysoup.io.validate import last_classifier_layer
from raysoup.results.store import ResultsStore
from raysoup.soup.group import GroupKey, Offer
from raysoup.soup.maker import SoupMaker
from raysoup.sweep.soup_actor import NAMESPACE, SoupFeeder, actor_name

__all__ = ["SoupCallback", "StateDictBackend", "TrialCheckpoint", "soup_tune_experiment"]

LIBRARY_METHODS = ("erm", "uniform", "greedy")  # ensembles need logits, which users don't give
LIBRARY_INIT = "pretrained"  # a group's init column: every trial starts from the user's init
StateFn = Callable[[dict[str, torch.Tensor]], float]


def _group_key(group: str) -> GroupKey:
    return GroupKey(dataset=group, test_env=-1, trial_seed=0, init=LIBRARY_INIT)


def _classifier_outputs(state: Mapping[str, torch.Tensor]) -> int:
    """What a raysoup checkpoint's ``num_classes`` must say of these weights (the layer
    raysoup checks on every load; 1 without one)."""
    found = last_classifier_layer({k: tuple(v.shape) for k, v in state.items()})
    return found[1] if found else 1


@dataclass(frozen=True)
class TrialCheckpoint:
    """A finished Tune trial as the soup needs it (sent from the driver to the actor)."""

    trial_id: str
    checkpoint: str  # the checkpoint folder Tune wrote
    id_val_acc: float  # the metric of the trial's last report
    group: str

    @classmethod
    def from_trial(
        cls, trial: Any, metric: str, group_by: Callable[[dict], str] | None, default_group: str
    ) -> TrialCheckpoint:
        """From a Tune ``Trial`` (a callback's, or ``ExperimentAnalysis.trials``)."""
        result = trial.last_result or {}
        checkpoint = trial.checkpoint
        if checkpoint is None:
            raise ValueError(f"trial {trial.trial_id}: reported no checkpoint; nothing to soup")
        if result.get("checkpoint_dir_name") != Path(checkpoint.path).name:
            raise ValueError(
                f"trial {trial.trial_id}: its last report carries no checkpoint (or another "
                f"one): report the final weights together with {metric!r}, so that the soup "
                f"ranks exactly the weights it averages"
            )
        if metric not in result:
            raise ValueError(
                f"trial {trial.trial_id}: metric {metric!r} is not in its last report "
                f"(it has {sorted(k for k in result if not k.startswith('_'))[:12]})"
            )
        value = result[metric]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and 0 <= value <= 1)
        ):
            raise ValueError(
                f"trial {trial.trial_id}: {metric}={value!r}; the soup ranks an accuracy, "
                f"expected a fraction in [0, 1]"
            )
        group = group_by(dict(trial.config)) if group_by else default_group
        return cls(trial.trial_id, str(checkpoint.path), float(value), str(group))


class _UserEvaluator:
    """Scores averaged weights with the user's functions (``Evaluator`` of the maker)."""

    def __init__(self, evaluate: StateFn, evaluate_test: StateFn | None) -> None:
        self.evaluate, self.evaluate_test = evaluate, evaluate_test

    def id_val_acc(self, state: Mapping[str, torch.Tensor]) -> float:
        return float(self.evaluate(dict(state)))

    def test_acc(self, state: Mapping[str, torch.Tensor]) -> float:
        return float(self.evaluate_test(dict(state))) if self.evaluate_test else math.nan

    def trial_logits(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError("library mode soups have no ensemble (no logits given)")

    def ensemble_accs(self, models: Iterable[Mapping[str, torch.Tensor]]) -> tuple[float, float]:
        raise NotImplementedError("library mode soups have no ensemble (no logits given)")


class StateDictBackend:
    """A ``SoupBackend`` for Tune checkpoints holding one state-dict file each."""

    def __init__(
        self, state_dict_file: str, evaluate: StateFn, evaluate_test: StateFn | None = None
    ) -> None:
        self.state_dict_file = state_dict_file
        self.evaluate = evaluate
        self.evaluate_test = evaluate_test
        self._num_classes = 1
        self._groups: dict[str, str] = {}  # trial id -> group, for a re-offered trial

    def _file(self, checkpoint: str) -> Path:
        return Path(checkpoint) / self.state_dict_file

    def load(self, offer: Offer) -> tuple[dict[str, torch.Tensor], str]:
        path = self._file(offer.checkpoint)
        content_hash = file_sha256(path)
        state = import_state_dict(path)
        self._num_classes = _classifier_outputs(state)
        return state, content_hash

    def content_hash(self, checkpoint: str) -> str | None:
        path = self._file(checkpoint)
        return file_sha256(path) if path.is_file() else None

    def offer(
        self, trial_id: str, checkpoint: str, id_val_acc: float | None = None, group: str = ""
    ) -> Offer:
        """The offer of a trial; a replaced checkpoint's ID-val is re-measured."""
        path = self._file(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: trial {trial_id}'s checkpoint has no {self.state_dict_file!r}"
            )
        if id_val_acc is None:
            id_val_acc = float(self.evaluate(import_state_dict(path)))
        return Offer(
            trial_id=trial_id,
            checkpoint=str(checkpoint),
            id_val_acc=id_val_acc,
            content_hash=file_sha256(path),
            group=_group_key(group or self._groups.get(trial_id, "")),
        )

    def offer_trial(self, trial: TrialCheckpoint) -> Offer:
        self._groups[trial.trial_id] = trial.group
        return self.offer(trial.trial_id, trial.checkpoint, trial.id_val_acc, trial.group)

    def evaluator(self, key: GroupKey, first: Offer) -> _UserEvaluator:
        return _UserEvaluator(self.evaluate, self.evaluate_test)

    def soup_meta(
        self, key: GroupKey, method: str, best: Offer, ingredients: list[str], metrics: dict
    ) -> CheckpointMeta:
        return CheckpointMeta(
            dataset=key.dataset,
            envs=[],
            arch="user",  # the trainable's own network: its keys are kept as they are
            num_classes=self._num_classes,
            stage=SOUP_STAGE,
            test_env=-1,
            hparams_seed=-1,
            init={
                "strategy": key.init,
                "method": method,
                "sources": list(ingredients),
                "weights": [1.0 / len(ingredients)] * len(ingredients),
                "state_dict_file": self.state_dict_file,
            },
            metrics={k: v for k, v in metrics.items() if not math.isnan(v)},
        )


def _trial_row(sweep: str, trial: TrialCheckpoint, offer: Offer) -> dict[str, Any]:
    return {
        "sweep": sweep,
        "stage": "target",
        "trial_id": trial.trial_id,
        "dataset": trial.group,
        "test_env": -1,
        "trial_seed": 0,
        "init": LIBRARY_INIT,
        "id_val_acc": trial.id_val_acc,
        "test_acc": float("nan"),
        "checkpoint": trial.checkpoint,
        "content_hash": offer.content_hash,
        "status": "done",
    }


def _maker(root: Location, name: str, backend: StateDictBackend, **options: Any) -> SoupMaker:
    return SoupMaker(root, name, backend=backend, methods=LIBRARY_METHODS, device="cpu", **options)


def _offer_all(maker: SoupMaker, trials: list[TrialCheckpoint]) -> int:
    backend = maker.backend
    assert isinstance(backend, StateDictBackend)
    offers = [backend.offer_trial(t) for t in trials]
    rows = [_trial_row(maker.sweep, t, o) for t, o in zip(trials, offers, strict=True)]
    for row in rows:
        maker.store.append("trials", [row], part_key=f"trial-{row['trial_id']}")
    return len(maker.offer(offers))


class LibrarySoupActor:
    """The soup actor of a user's Tune sweep (one per ``<storage>/<name>``)."""

    def __init__(self, root: str, name: str, backend: StateDictBackend, options: dict) -> None:
        self.maker = _maker(
            root,
            name,
            backend,
            log=lambda line: print(line, file=sys.stdout, flush=True),
            **options,
        )

    def offer(self, trials: list[TrialCheckpoint]) -> int:
        return _offer_all(self.maker, trials)

    def finalize(self) -> list[dict[str, Any]]:
        self.maker.finalize_all()
        return self.rows()

    def rows(self) -> list[dict[str, Any]]:
        soups = ResultsStore(str(SweepLayout(self.maker.root).results)).read("soups")
        return soups.to_dict("records")


def library_backend(
    name: str,
    state_dict_file: str,
    evaluate: StateFn,
    evaluate_test: StateFn | None,
    accept: str,
) -> StateDictBackend:
    """The options both entry points share, checked before any Ray or file work (a
    ``ValueError`` naming the bad value), as the backend that reads and scores trials."""
    if accept not in ACCEPT:
        raise ValueError(f"accept={accept!r}: expected one of {ACCEPT}")
    if not name or "/" in name:
        raise ValueError(f"name={name!r}: expected a plain folder name")
    for what, fn in (("evaluate", evaluate), ("evaluate_test", evaluate_test)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{what}={fn!r}: expected a function of a state dict")
    if not state_dict_file or "/" in state_dict_file:
        raise ValueError(f"state_dict_file={state_dict_file!r}: expected a file name")
    return StateDictBackend(state_dict_file, evaluate, evaluate_test)


class SoupCallback(SoupFeeder):
    """Souping while any Tune sweep runs (see the module docstring): ``SoupFeeder``'s
    batching (never waiting in Tune's loop), fed with the trials' state-dict checkpoints."""

    def __init__(
        self,
        *,
        storage: str | Path,
        name: str,
        metric: str,
        state_dict_file: str,
        evaluate: StateFn,
        evaluate_test: StateFn | None = None,
        group_by: Callable[[dict], str] | None = None,
        accept: str = "ge",
        max_models: int = 2,
        num_cpus: float = 0.0,
        num_gpus: float = 0.0,
        every_s: float = 0.0,
    ) -> None:
        self.backend = library_backend(name, state_dict_file, evaluate, evaluate_test, accept)
        self.root = str(SweepLayout.of(str(storage), name).root)
        super().__init__(actor_name(name, self.root), every_s)
        self.sweep = name
        self.metric = metric
        self.group_by = group_by
        self.options = {"accept": accept, "max_models": max_models}
        self.resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        self.finished: list[TrialCheckpoint] = []  # every trial handed over, for finalize
        self.skipped: dict[str, str] = {}  # trial id -> why it could not be souped

    def setup(self, **info: Any) -> None:
        self._start()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            finished = TrialCheckpoint.from_trial(trial, self.metric, self.group_by, self.sweep)
        except ValueError as error:  # never stop the other trials: this one is not souped
            self.skipped[trial.trial_id] = str(error)
            print(f"raysoup: warning: not souped: {error}", file=sys.stderr, flush=True)
            return
        self.finished.append(finished)
        self._waiting.append(finished)
        self._send()

    def _start(self) -> Any:
        """The sweep's soup actor: the running one, or a new one restoring the state."""
        if self._actor is None:
            self._actor = (
                ray.remote(LibrarySoupActor)
                .options(
                    name=self.name,
                    namespace=NAMESPACE,
                    get_if_exists=True,
                    max_restarts=-1,
                    max_task_retries=-1,
                    **self.resources,
                )
                .remote(self.root, self.sweep, self.backend, self.options)
            )
        return self._actor

    def finalize(self) -> list[dict[str, Any]]:
        """After ``tuner.fit()``: hand over every finished trial again (idempotent: a batch
        lost on the way is not lost), write every group's final soups and return the
        ``soups`` rows. Blocking: call it outside Tune's loop."""
        actor = self._start()
        self._waiting = []
        ray.get(actor.offer.remote(self.finished))
        return ray.get(actor.finalize.remote())


def soup_tune_experiment(
    experiment: str | Path,
    *,
    storage: str | Path,
    name: str,
    metric: str,
    state_dict_file: str,
    evaluate: StateFn,
    evaluate_test: StateFn | None = None,
    group_by: Callable[[dict], str] | None = None,
    accept: str = "ge",
    max_models: int = 2,
) -> list[dict[str, Any]]:
    """The soups of a finished Tune experiment folder, built post hoc in this process and
    written to ``<storage>/<name>`` (replacing what is there): the same ``SoupMaker`` as
    ``SoupCallback``'s actor, so the same ingredients and weights. Returns the soups rows."""
    from ray.tune import ExperimentAnalysis

    backend = library_backend(name, state_dict_file, evaluate, evaluate_test, accept)
    analysis = ExperimentAnalysis(str(Path(experiment).expanduser()))
    finished = [t for t in analysis.trials if t.status == "TERMINATED"]
    if not finished:
        raise FileNotFoundError(f"{experiment}: no finished trial to soup")
    trials = [TrialCheckpoint.from_trial(t, metric, group_by, name) for t in finished]
    trials.sort(key=lambda t: (-t.id_val_acc, t.trial_id))  # Recipe 1's order: fewest tries
    root = SweepLayout.of(str(storage), name).root
    maker = _maker(root, name, backend, accept=accept, max_models=max_models, persist=False)
    _offer_all(maker, trials)
    maker.finalize_all()
    return ResultsStore(str(SweepLayout(root).results)).read("soups").to_dict("records")
