"""The results store: ``<storage>/<name>/results/{trials,soup_steps,soups}/part-*.parquet``.

- One ``append`` writes one part file, atomically: the bytes go to a hidden sibling
  (``.part-<key>.parquet.tmp-<uuid>``) which is then renamed into place
  (``raysoup.io.storage.write_bytes_atomic``). Arrow's dataset
  discovery (and so ``pd.read_parquet(folder)``) skips names starting with ``.`` or
  ``_``, so a reader running during a write, or after a crash, never sees half a file.
- ``part_key`` names the part, so a retried or resumed write replaces its own rows
  instead of duplicating them.
- The root may be a local path or any ``pyarrow.fs`` URI (``s3://bucket/run/results``).
  On object stores the rename is a server-side copy, still atomic per object.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysoup.contract import DIAGNOSTICS
from raysoup.errors import BadInputError
from raysoup.io import storage
from raysoup.io.layout import RESULTS, SweepLayout
from raysoup.results.schema import KINDS, _check_kind, schema, validate_rows

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
READ_ATTEMPTS = 3
PART_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,199}$")


class DamagedResultsError(BadInputError):
    """A part file that cannot be read; the message names it and how to recover."""


REPAIR = (
    "run the sweep's command again (same config and --storage): it sets damaged parts "
    "aside and rewrites their rows from the checkpoints and the soup state"
)
REPAIR_DIAGNOSTICS = (
    "run `raysoup diagnose` again: it sets damaged diagnostics parts aside and computes them anew"
)


class ResultsStore:
    """Append-only Parquet datasets under one run's ``results/`` folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self._fs, self._path = storage.filesystem(self.root)

    def __repr__(self) -> str:
        return f"ResultsStore({self.root!r})"

    def folder(self, kind: str) -> str:
        """The dataset folder, as a path inside this store's filesystem."""
        _check_kind(kind)
        return f"{self._path}/{kind}"

    def _display(self, path: str) -> str:
        """``path`` spelled the way the user spelled the root (URI or local path)."""
        if not storage.is_uri(self.root):
            return self.root.rstrip("/") + path[len(self._path) :]
        return str(storage.join(self.root, path[len(self._path) :]))  # before any ?query

    def append(self, kind: str, rows: Sequence[Mapping[str, Any]], part_key: str) -> str | None:
        """Write ``rows`` as the part ``part_key`` of ``kind``; returns the file written.

        Writing the same ``part_key`` again replaces that part. With no rows, nothing is
        written and an earlier part of that key is removed (the part now holds no rows);
        returns ``None``.
        """
        _check_kind(kind)
        if not isinstance(part_key, str) or not PART_KEY.match(part_key):
            raise ValueError(
                f"part_key {part_key!r} must be 1-200 characters from [A-Za-z0-9_.=+-], "
                f"starting with a letter or digit"
            )
        table = validate_rows(kind, rows)  # validate first: a bad row writes nothing
        folder = self.folder(kind)
        final = f"{folder}/{PART_PREFIX}{part_key}{PART_SUFFIX}"
        if table.num_rows == 0:
            if self._fs.get_file_info(final).type == pafs.FileType.File:
                self._fs.delete_file(final)
            return None
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue()
        storage.write_atomic_in(self._fs, final, memoryview(data))
        return self._display(final)

    def has_part(self, kind: str, part_key: str) -> bool:
        """Whether the part ``part_key`` of ``kind`` exists (finished writes only)."""
        path = f"{self.folder(kind)}/{PART_PREFIX}{part_key}{PART_SUFFIX}"
        return self._fs.get_file_info(path).type == pafs.FileType.File

    def part_files(self, kind: str) -> list[str]:
        """The finished part files of ``kind``, sorted (temporary files are not listed)."""
        selector = pafs.FileSelector(self.folder(kind), allow_not_found=True)
        names = [
            info.path
            for info in self._fs.get_file_info(selector)
            if info.type == pafs.FileType.File
            and info.base_name.startswith(PART_PREFIX)
            and info.base_name.endswith(PART_SUFFIX)
        ]
        return sorted(names)

    def read_table(self, kind: str) -> pa.Table:
        """All rows of ``kind``; the columns are the union over part files.

        (``pd.read_parquet(folder)`` takes the columns of one part file only; parts
        written for datasets with more envs, or with other extra columns, can differ.)
        """
        for attempt in range(READ_ATTEMPTS):
            files = self.part_files(kind)
            if not files:
                return schema(kind).empty_table()
            try:
                return self._read_files(kind, files)
            except FileNotFoundError:
                # A part was removed (re-appended with no rows) between listing and
                # reading; list again.
                if attempt == READ_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def damage(self, path: str) -> str | None:
        """Why the part file ``path`` cannot be read (its footer, checked), or ``None``."""
        try:
            pq.read_metadata(path, filesystem=self._fs)
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError) as error:
            return str(error).splitlines()[0]
        return None

    def set_aside_damaged(self, kinds: Sequence[str] = KINDS) -> list[str]:
        """Move every unreadable part file of ``kinds`` to a hidden ``.damaged-*`` sibling
        (kept for a post-mortem, skipped by readers); returns what was moved and why."""
        moved = []
        for kind in kinds:
            for path in self.part_files(kind):
                why = self.damage(path)
                if why is None:
                    continue
                folder, name = path.rsplit("/", 1)
                self._fs.move(path, f"{folder}/.damaged-{name}-{uuid.uuid4().hex[:8]}")
                moved.append(f"{self._display(path)} ({why})")
        return moved

    def part_keys(self, kind: str) -> set[str]:
        """The ``part_key`` of every finished part of ``kind``."""
        names = (path.rsplit("/", 1)[-1] for path in self.part_files(kind))
        return {name[len(PART_PREFIX) : -len(PART_SUFFIX)] for name in names}

    def _read_files(self, kind: str, files: list[str]) -> pa.Table:
        try:
            return self._read_files_unchecked(kind, files)
        except (pa.ArrowException, OSError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            damaged = [(path, why) for path in files if (why := self.damage(path))]
            if not damaged:
                raise
            path, why = damaged[0]
            raise DamagedResultsError(
                f"{self._display(path)} is damaged ({why})"
                f"{f' with {len(damaged) - 1} other part(s)' if len(damaged) > 1 else ''}: "
                f"{REPAIR_DIAGNOSTICS if kind == DIAGNOSTICS else REPAIR}"
            ) from error

    def _read_files_unchecked(self, kind: str, files: list[str]) -> pa.Table:
        dataset = ds.dataset(files, format="parquet", filesystem=self._fs)
        schemas = [fragment.physical_schema for fragment in dataset.get_fragments()]
        unified = pa.unify_schemas([schema(kind), *schemas])
        return ds.dataset(files, schema=unified, format="parquet", filesystem=self._fs).to_table()

    def read(self, kind: str) -> pd.DataFrame:
        """All rows of ``kind`` as a DataFrame (empty, with the schema's columns, if none)."""
        return self.read_table(kind).to_pandas()

    def read_all(self) -> dict[str, pd.DataFrame]:
        return {kind: self.read(kind) for kind in KINDS}


def load_results(path: str | os.PathLike[str]) -> dict[str, pd.DataFrame]:
    """The three datasets of a run, given the run folder ``<storage>/<name>`` or its
    ``results/`` folder (a local path or a URI)."""
    fs, inner = storage.filesystem(os.fspath(path))
    text = os.fspath(path).rstrip("/")
    has_results = fs.get_file_info(f"{inner}/{RESULTS}").type == pafs.FileType.Directory
    has_kinds = any(
        fs.get_file_info(f"{inner}/{kind}").type == pafs.FileType.Directory for kind in KINDS
    )
    if has_results or not has_kinds:
        # A run folder (or one with no results yet; its results/ would be empty anyway).
        if not has_results and fs.get_file_info(inner).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no run or results folder at {text}")
        text = str(SweepLayout(text).results)
    return ResultsStore(text).read_all()
