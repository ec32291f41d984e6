"""Where every file of a sweep folder lives: the one place that knows their names.

A sweep folder is ``<storage>/<name>/`` (a local path or a URI, the same layout either
way). Every module and experiment script asks ``SweepLayout`` for a location instead of
joining folder names itself; ``ENTRIES`` describes the layout for people (the README's
list is checked against it by a test).
"""

from __future__ import annotations

from dataclasses import dataclass

from raysoup.contract import SOUP_STAGE
from raysoup.io import storage
from raysoup.io.storage import Location

RECORD = "sweep.json"
LEASE = "lease.json"
LEASE_LOCK = ".lease.lock"  # local paths: taking the lease over runs under flock on it
TUNE = "tune"
TUNE_EXPERIMENT = "sweep"  # <root>/tune/sweep/: the one Tune experiment of every run
CHECKPOINTS = "checkpoints"
FAILURES = "failures"
RESULTS = "results"
SOUP_STATE = "soup_state.json"

# (path pattern under the sweep folder, what it holds), in the README's order.
ENTRIES: tuple[tuple[str, str], ...] = (
    (RECORD, "the config the sweep was made with"),
    (f"{TUNE}/{TUNE_EXPERIMENT}/", "Ray Tune's experiment state and trial logs"),
    (f"{CHECKPOINTS}/<stage>/<key>/", "one checkpoint per run (base, lp, aux, target)"),
    (f"{CHECKPOINTS}/{SOUP_STAGE}/<method>/<group>/", "soup checkpoints"),
    (f"{FAILURES}/<stage>/<key>.txt", "the full error of a run that failed"),
    (LEASE, "the driver holding the sweep, while one does"),
    (LEASE_LOCK, "local paths: the lock of a lease take-over"),
    (SOUP_STATE, "the soup actor's state"),
    (f"{RESULTS}/", "the Parquet datasets trials/, soup_steps/, soups/, diagnostics/"),
)


@dataclass(frozen=True)
class SweepLayout:
    """The locations of one sweep folder ``root`` (an absolute ``Path``, or a URI)."""

    root: Location

    @classmethod
    def of(cls, storage_root: Location, name: str) -> SweepLayout:
        """The sweep ``name`` under ``storage_root`` (resolved: absolute, no ``..``)."""
        return cls(storage.join(storage.resolve(storage_root), name))

    @property
    def record(self) -> Location:
        return storage.join(self.root, RECORD)

    @property
    def lease(self) -> Location:
        return storage.join(self.root, LEASE)

    @property
    def lease_lock(self) -> Location:
        return storage.join(self.root, LEASE_LOCK)

    @property
    def tune(self) -> Location:
        """Tune's ``storage_path``; the experiment is ``TUNE_EXPERIMENT`` below it."""
        return storage.join(self.root, TUNE)

    def checkpoints(self, stage: str | None = None) -> Location:
        """Every run's checkpoints, or one stage's."""
        here = storage.join(self.root, CHECKPOINTS)
        return here if stage is None else storage.join(here, stage)

    def checkpoint(self, stage: str, key: str) -> Location:
        return storage.join(self.checkpoints(stage), key)

    def failure(self, stage: str, key: str) -> Location:
        return storage.join(self.root, FAILURES, stage, f"{key}.txt")

    @property
    def results(self) -> Location:
        return storage.join(self.root, RESULTS)

    @property
    def soup_state(self) -> Location:
        return storage.join(self.root, SOUP_STATE)

    def soup_checkpoint(self, method: str, group: str) -> Location:
        """The checkpoint of soup ``method`` of the group whose slug is ``group``."""
        return storage.join(self.checkpoints(SOUP_STAGE), method, group)
