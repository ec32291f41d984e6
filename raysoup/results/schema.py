"""Arrow schemas of the four Parquet datasets, and row validation.

- The column names are the user-facing contract (DESIGN.md): ``trials``, ``soup_steps``
  and ``soups``. Extra columns are allowed; the fixed ones keep their types so that every
  part file of a dataset reads back with the same dtypes.
- Rows are checked value by value *before* Arrow sees them, so a bad row is reported
  with the dataset, the column and the value, instead of an Arrow conversion error
  (or, worse, a silent cast).
- ``trials`` always carries ``env{i}_in_acc``/``env{i}_out_acc`` for ``i < MIN_ENVS``
  (null where a dataset has fewer envs): ``pd.read_parquet(folder)`` takes the columns
  of the *first* part file it finds, so padding keeps a 4-env dataset's parts from
  hiding a 6-env dataset's columns.
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from raysoup.contract import (
    ALL_SEEDS,
    ALL_SEEDS_METHODS,
    DIAGNOSTIC_PARTS,
    DIAGNOSTICS,
    INITS,
    METHODS,
    STAGES,
)

SWEEP_KINDS = ("trials", "soup_steps", "soups")  # what a sweep writes
KINDS = (*SWEEP_KINDS, DIAGNOSTICS)  # DIAGNOSTICS: written by ``raysoup diagnose``
# METHODS: erm: best single trial by ID-val; uniform / greedy: soups of a group's trials;
# uniform_all: one uniform soup of every trial seed's trials (DiWA's uniform†,
# trial_seed -1, no ID-val: NaN); ensemble: the logit average of a group's trials.
MIN_ENVS = 6  # DomainBed's largest datasets (DomainNet) have 6 envs
ENV_ACC = re.compile(r"^env(\d+)_(in|out)_acc$")
TIMESTAMP = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class Column:
    """One fixed column: its Arrow type and what a value may be."""

    name: str
    type: pa.DataType
    required: bool = True  # must be present and non-null in every row
    accuracy: bool = False  # a fraction in [0, 1]
    nan_ok: bool = False  # NaN allowed (a missing test accuracy)
    choices: tuple[str, ...] = ()


def _acc(name: str, *, required: bool = True, nan_ok: bool = False) -> Column:
    return Column(name, pa.float64(), required=required, accuracy=True, nan_ok=nan_ok)


def _env_columns(n_envs: int) -> list[Column]:
    return [
        _acc(f"env{i}_{split}_acc", required=False)
        for i in range(n_envs)
        for split in ("in", "out")
    ]


_TRIALS = [
    Column("sweep", pa.string()),
    Column("stage", pa.string(), choices=STAGES),
    Column("trial_id", pa.string()),
    Column("dataset", pa.string()),
    Column("test_env", pa.int64()),
    Column("trial_seed", pa.int64()),
    Column("hparams_seed", pa.int64(), required=False),
    Column("init", pa.string(), required=False, choices=INITS),  # required when target
    Column("init_sources", pa.list_(pa.string()), required=False),
    Column("init_weights", pa.list_(pa.float64()), required=False),
    Column("lr", pa.float64(), required=False),
    Column("weight_decay", pa.float64(), required=False),
    Column("batch_size", pa.int64(), required=False),
    Column("resnet_dropout", pa.float64(), required=False),
    Column("steps", pa.int64(), required=False),
    _acc("id_val_acc", required=False),  # a failed trial has none
    _acc("test_acc", required=False, nan_ok=True),
    Column("checkpoint", pa.string(), required=False),
    Column("status", pa.string()),
    Column("wall_s", pa.float64(), required=False),
]

# A failed trial (status "failed"): the first line of its error, and the file holding the
# full traceback (null on done rows). Typed and in every part, so pd.read_parquet sees them.
_FAILURE_EXTRAS = [
    Column("error", pa.string(), required=False),
    Column("error_file", pa.string(), required=False),
    # init sources trained on undeclared data (``raysoup pool add --undeclared``)
    Column("undeclared_sources", pa.int64(), required=False),
]

_GROUP_EXTRAS = [
    Column("dataset", pa.string(), required=False),
    Column("test_env", pa.int64(), required=False),
    Column("trial_seed", pa.int64(), required=False),
    Column("init", pa.string(), required=False, choices=INITS),
]

_SOUP_STEPS = [
    Column("sweep", pa.string()),
    Column("method", pa.string(), choices=METHODS),
    Column("trial_id", pa.string()),
    Column("rank", pa.int64()),
    _acc("candidate_id_val_acc"),
    Column("accepted", pa.bool_()),
    Column("soup_size", pa.int64()),
    _acc("soup_id_val_acc"),
    Column("decided_at", TIMESTAMP),
    *_GROUP_EXTRAS,
]

_SOUPS = [
    Column("sweep", pa.string()),
    Column("method", pa.string(), choices=METHODS),
    Column("dataset", pa.string()),
    Column("test_env", pa.int64()),
    Column("trial_seed", pa.int64()),
    Column("init", pa.string(), choices=INITS),
    Column("n_ingredients", pa.int64()),
    Column("ingredients", pa.list_(pa.string())),
    _acc("id_val_acc", nan_ok=True),  # NaN only for uniform_all (see _row_rules)
    _acc("test_acc", nan_ok=True),
    Column("checkpoint", pa.string(), required=False),
]

# How many trials a soup chose from, of how many were planned (fewer: some failed).
_SOUP_EXTRAS = [
    Column("n_trials", pa.int64(), required=False),
    Column("n_planned", pa.int64(), required=False),
]

# ``raysoup diagnose`` (raysoup.diagnostics): one row per evaluated model. ``a`` is the
# interpolation coefficient (landscape: the plane's x, ``b`` its y); ``angle`` rows hold the
# pair's average (a = 0.5), the angle between the two deltas and the average's gain.
_DIAGNOSTICS = [
    Column("sweep", pa.string()),
    Column("diagnostic", pa.string(), choices=DIAGNOSTIC_PARTS),
    Column("dataset", pa.string()),
    Column("test_env", pa.int64()),
    Column("trial_seed", pa.int64()),
    Column("init", pa.string(), choices=INITS),
    Column("start", pa.string()),
    Column("end", pa.string()),
    Column("point", pa.int64(), required=False),
    Column("a", pa.float64()),
    Column("b", pa.float64(), required=False),
    Column("label", pa.string(), required=False),
    _acc("id_val_acc"),
    Column("id_val_loss", pa.float64()),
    _acc("test_acc", nan_ok=True),
    Column("test_loss", pa.float64(), nan_ok=True),
    Column("angle_deg", pa.float64(), required=False, nan_ok=True),
    Column("gain_id_val", pa.float64(), required=False),
    Column("gain_test", pa.float64(), required=False, nan_ok=True),
    Column("part", pa.string()),
    Column("signature", pa.string()),
]

COLUMNS: dict[str, list[Column]] = {
    "trials": _TRIALS + _FAILURE_EXTRAS + _env_columns(MIN_ENVS),
    "soup_steps": _SOUP_STEPS,
    "soups": _SOUPS + _SOUP_EXTRAS,
    DIAGNOSTICS: _DIAGNOSTICS,
}
# The contract's own columns (for docs and tests); COLUMNS adds typed optional extras.
CONTRACT_COLUMNS: dict[str, list[str]] = {
    "trials": [c.name for c in _TRIALS],
    "soup_steps": [c.name for c in _SOUP_STEPS if c not in _GROUP_EXTRAS],
    "soups": [c.name for c in _SOUPS],
    DIAGNOSTICS: [c.name for c in _DIAGNOSTICS],
}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown results dataset {kind!r}; expected one of {KINDS}")


def schema(kind: str) -> pa.Schema:
    """The fixed part of ``kind``'s schema (every part file has at least these columns)."""
    _check_kind(kind)
    return pa.schema([pa.field(c.name, c.type, nullable=not c.required) for c in COLUMNS[kind]])


# ---------------------------------------------------------------- value checks


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _to_timestamp(value: Any) -> dt.datetime | None:
    """Aware datetimes are converted to UTC; naive ones are taken to be UTC already."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, np.datetime64):
        value = value.astype("datetime64[us]").item()
    if not isinstance(value, dt.datetime):  # pd.Timestamp is a datetime subclass
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def _convert(column: Column, value: Any) -> tuple[bool, Any]:
    """``(ok, value as Arrow should get it)`` for one non-null value."""
    kind = column.type
    if pa.types.is_string(kind):
        return isinstance(value, str), value
    if pa.types.is_int64(kind):
        return _is_int(value), int(value) if _is_int(value) else value
    if pa.types.is_float64(kind):
        return _is_real(value), float(value) if _is_real(value) else value
    if pa.types.is_boolean(kind):
        return isinstance(value, (bool, np.bool_)), bool(value)
    if pa.types.is_timestamp(kind):
        stamp = _to_timestamp(value)
        return stamp is not None, stamp
    if pa.types.is_list(kind):
        sequence = isinstance(value, (Sequence, np.ndarray))
        if not sequence or isinstance(value, (str, bytes)):
            return False, value
        inner = Column(column.name, kind.value_type)
        items = [_convert(inner, item) for item in value]
        return all(ok for ok, _ in items), [item for _, item in items]
    raise TypeError(f"no converter for Arrow type {kind}")  # a bug in COLUMNS


def _is_null(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT


def _check_value(kind: str, column: Column, row: Mapping[str, Any], index: int) -> Any:
    def bad(why: str) -> ValueError:
        return ValueError(
            f"{kind}: row {index}: column {column.name!r} {why}, got {row.get(column.name)!r}"
        )

    if column.name not in row or _is_null(row[column.name]):
        if column.required:
            raise bad("is required" if column.name not in row else "must not be null")
        return None
    ok, value = _convert(column, row[column.name])
    if not ok:
        raise bad(f"must be of type {column.type}")
    if column.choices and value not in column.choices:
        raise bad(f"must be one of {column.choices}")
    if column.accuracy:
        if math.isnan(value):
            if not column.nan_ok:
                raise bad("must be an accuracy in [0, 1] (NaN only allowed for test_acc)")
        elif not 0.0 <= value <= 1.0:
            raise bad("must be an accuracy (a fraction) in [0, 1]")
    return value


def _row_rules(kind: str, row: Mapping[str, Any], index: int) -> None:
    """Rules that tie columns together."""
    if kind == "trials" and row.get("stage") == "target" and _is_null(row.get("init")):
        raise ValueError(
            f"trials: row {index}: column 'init' is required for stage 'target', got None"
        )
    if kind == "soups":
        method, seed, id_val = row.get("method"), row.get("trial_seed"), row.get("id_val_acc")
        all_seeds = method in ALL_SEEDS_METHODS
        if _is_int(seed) and (seed == ALL_SEEDS) != all_seeds:
            raise ValueError(
                f"soups: row {index}: column 'trial_seed' must be {ALL_SEEDS} exactly for "
                f"methods {ALL_SEEDS_METHODS} (method {method!r}), got {seed!r}"
            )
        if _is_real(id_val) and math.isnan(id_val) and not all_seeds:
            raise ValueError(
                f"soups: row {index}: column 'id_val_acc' must be an accuracy in [0, 1] "
                f"(NaN only for methods {ALL_SEEDS_METHODS}), got {id_val!r}"
            )


def validate_rows(kind: str, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """``rows`` as an Arrow table with ``kind``'s schema; ``ValueError`` on any bad value.

    Columns beyond the fixed ones are kept: ``env{i}_in_acc``/``env{i}_out_acc`` as
    float64 accuracies, anything else with the type Arrow infers.
    """
    _check_kind(kind)
    fixed = COLUMNS[kind]
    fixed_names = {c.name for c in fixed}
    extras: dict[str, Column | None] = {}
    for row in rows:
        for name in row:
            if name not in fixed_names and name not in extras:
                extras[name] = _acc(name, required=False) if ENV_ACC.match(name) else None
    env_extras = sorted(
        (n for n, c in extras.items() if c is not None),
        key=lambda n: (int(ENV_ACC.match(n).group(1)), n),  # type: ignore[union-attr]
    )
    checked = fixed + [extras[n] for n in env_extras]  # type: ignore[misc]
    data: dict[str, list[Any]] = {c.name: [] for c in checked}
    for index, row in enumerate(rows):
        _row_rules(kind, row, index)
        for column in checked:
            data[column.name].append(_check_value(kind, column, row, index))
    arrays: dict[str, pa.Array] = {c.name: pa.array(data[c.name], type=c.type) for c in checked}
    fields = [pa.field(c.name, c.type, nullable=not c.required) for c in checked]
    for name, column in extras.items():
        if column is not None:
            continue
        values = [row.get(name) for row in rows]
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise ValueError(
                f"{kind}: column {name!r} has values Arrow cannot store as one type "
                f"({values[:3]!r}...): {error}"
            ) from error
        fields.append(pa.field(name, arrays[name].type))
    return pa.Table.from_arrays([arrays[f.name] for f in fields], schema=pa.schema(fields))
