"""DomainBed-style tables from the ``soups`` (or ``trials``) dataset.

- One row per (method, init), one column per test env plus ``Avg``; a cell is the mean
  ± standard error over trial seeds of the test accuracy in percent, with DomainBed's
  ``SE = 100 * std(x) / sqrt(n)`` (``ddof=0``, so a single seed shows ± 0.0).
- ``Avg`` is computed per trial seed (the mean over test envs of that seed), then mean ±
  SE over seeds, as DomainBed's summary table does; only seeds that have every test env
  count, and with none the cell shows ``X``.
- ``uniform_all`` rows (one soup over every trial seed, ``trial_seed = -1``) have one
  value per test env: their SE is NaN (shown without ``±``) and a legend line says so.
- ``paper_table`` returns numbers (columns ``(env, "mean")``, ``(env, "se")``), so tests
  and notebooks use them directly; ``format_table`` turns them into text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from raysoup.contract import ALL_SEEDS_METHODS, GROUP_COLUMNS, INITS, METHODS, TABLE_FORMATS

FORMATS = TABLE_FORMATS
DONE_STATUSES = ("done", "completed", "ok", "success", "terminated")
AVG = "Avg"
MISSING = "X"
SOUP_COLUMNS = [
    "sweep",
    "method",
    "dataset",
    "test_env",
    "trial_seed",
    "init",
    "n_ingredients",
    "ingredients",
    "id_val_acc",
    "test_acc",
    "checkpoint",
]
GROUP = list(GROUP_COLUMNS)
LEGENDS = {
    "uniform_all": "uniform_all: one uniform soup of every trial seed's trials per test env "
    "(DiWA's uniform†): a single value, no SE over seeds",
    "ensemble": "ensemble: logit average of a group's trials (not one model)",
}


def _order(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """``preferred`` ones first in that order, then the others alphabetically."""
    return sorted(
        set(values), key=lambda v: (preferred.index(v) if v in preferred else len(preferred), v)
    )


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """DomainBed's mean and standard error, in percent, of fractions in [0, 1]."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(100 * x.mean()), float(100 * x.std(ddof=0) / math.sqrt(x.size))


def _pick_dataset(soups: pd.DataFrame, dataset: str | None) -> str | None:
    present = sorted(soups["dataset"].dropna().unique().tolist())
    if dataset is None:
        if len(present) > 1:
            raise ValueError(
                f"the results hold several datasets {present}: pick one with dataset=..."
            )
        return present[0] if present else None
    if dataset not in present:
        raise ValueError(f"no results for dataset {dataset!r}; the results hold {present}")
    return dataset


def _unique_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """Exact repeats are dropped; two different accuracies for one cell are an error."""
    key = ["method", "init", "test_env", "trial_seed"]
    rows = rows.drop_duplicates(subset=[*key, "test_acc"])
    clash = rows[rows.duplicated(subset=key, keep=False)]
    if not clash.empty:
        first = clash.iloc[0]
        raise ValueError(
            f"several soups rows with different test_acc for method={first['method']!r}, "
            f"init={first['init']!r}, test_env={first['test_env']}, "
            f"trial_seed={first['trial_seed']} (e.g. from different sweeps): filter the "
            f"soups table (by sweep) before making the table"
        )
    return rows


def paper_table(
    soups: pd.DataFrame,
    dataset: str | None = None,
    env_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The DomainBed table of ``dataset`` (optional when the results hold only one).

    Index: ``(method, init)``. Columns: ``(env, stat)`` with ``stat`` in ``mean``/``se``
    and ``env`` the test env index as a string (or its name from ``env_names``, which
    also makes every env of the dataset a column, data or not), then ``Avg``. Rows with a
    NaN ``test_acc`` count as missing seeds.
    """
    if soups.empty:
        chosen, rows = dataset, pd.DataFrame(columns=SOUP_COLUMNS)
    else:
        chosen = _pick_dataset(soups, dataset)
        rows = soups[(soups["dataset"] == chosen) & soups["test_acc"].notna()]
    if env_names is not None:
        envs = list(range(len(env_names)))
        labels = [str(name) for name in env_names]
        unknown = sorted(int(e) for e in set(rows["test_env"]) - set(envs))
        if unknown:
            raise ValueError(
                f"test envs {unknown} have no name in env_names {list(env_names)} "
                f"({len(env_names)} names for envs 0..{len(env_names) - 1})"
            )
    else:
        envs = sorted(int(e) for e in rows["test_env"].unique())
        labels = [str(e) for e in envs]
    columns = pd.MultiIndex.from_product([[*labels, AVG], ["mean", "se"]], names=["env", "stat"])
    if rows.empty:
        index = pd.MultiIndex.from_tuples([], names=["method", "init"])
        table = pd.DataFrame(index=index, columns=columns, dtype=float)
        table.attrs["dataset"] = chosen
        return table
    rows = _unique_cells(rows)
    records = []
    index_tuples = []
    for method in _order(rows["method"].tolist(), METHODS):
        of_method = rows[rows["method"] == method]
        for init in _order(of_method["init"].tolist(), INITS):
            group = of_method[of_method["init"] == init]
            record: list[float] = []
            for env in envs:
                record.extend(mean_se(group.loc[group["test_env"] == env, "test_acc"]))
            by_seed = group.pivot(index="trial_seed", columns="test_env", values="test_acc")
            by_seed = by_seed.reindex(columns=envs).dropna()
            record.extend(mean_se(by_seed.mean(axis=1)) if envs else (math.nan, math.nan))
            if method in ALL_SEEDS_METHODS:  # one soup over the seeds: no spread to show
                record[1::2] = [math.nan] * (len(record) // 2)
            records.append(record)
            index_tuples.append((method, init))
    index = pd.MultiIndex.from_tuples(index_tuples, names=["method", "init"])
    table = pd.DataFrame(records, index=index, columns=columns, dtype=float)
    table.attrs["dataset"] = chosen
    return table


def _cell(mean: float, se: float, pm: str) -> str:
    if math.isnan(mean):
        return MISSING
    return f"{mean:.1f}" if math.isnan(se) else f"{mean:.1f}{pm}{se:.1f}"


UNDECLARED_MARK = "*"


def legend(table: pd.DataFrame) -> list[str]:
    """Notes on the methods of ``table`` that are not a mean ± SE of single models, and on
    the inits marked as using auxiliary data nobody declared."""
    methods = set(table.index.get_level_values("method"))
    notes = [text for method, text in LEGENDS.items() if method in methods]
    marked = table.attrs.get("undeclared_inits", [])
    if marked:
        notes.append(
            f"{', '.join(f'{init}{UNDECLARED_MARK}' for init in marked)}: some trials start from "
            f"auxiliary checkpoints whose training data is undeclared (trials."
            f"undeclared_sources > 0): they may have seen the target dataset"
        )
    return notes


def undeclared_inits(trials: pd.DataFrame) -> list[str]:
    """The inits of which some target trial used undeclared auxiliary data."""
    if trials.empty or "undeclared_sources" not in trials:
        return []
    used = trials[trials["undeclared_sources"].fillna(0) > 0]
    return _order(used["init"].dropna().unique().tolist(), INITS)


def mark_undeclared(table: pd.DataFrame, inits: Sequence[str]) -> pd.DataFrame:
    """``table`` with the rows of ``inits`` labelled ``init*`` and a note saying why."""
    if not inits or table.empty:
        return table
    marked = table.rename(index={init: f"{init}{UNDECLARED_MARK}" for init in inits}, level="init")
    marked.attrs = dict(table.attrs, undeclared_inits=list(inits))
    return marked


def _envs(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table.columns.get_level_values(0)))


def _cells(table: pd.DataFrame, pm: str) -> list[list[str]]:
    return [
        [method, init]
        + [
            _cell(table.loc[(method, init), (e, "mean")], table.loc[(method, init), (e, "se")], pm)
            for e in _envs(table)
        ]
        for method, init in table.index
    ]


def _latex_escape(text: str) -> str:
    for char in ("\\", "&", "%", "$", "#", "_", "{", "}"):
        text = text.replace(char, "\\" + char)
    return text


def format_table(table: pd.DataFrame, fmt: str = "text") -> str:
    """``table`` from ``paper_table`` as ``text``, ``markdown``, ``csv``, ``latex`` or
    ``html`` (a ``<table>`` and its notes, escaped, for the report)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {FORMATS}")
    envs = _envs(table)
    header = ["method", "init", *envs]
    if fmt == "csv":
        flat = table.copy()
        flat.columns = [f"{env}_{stat}" for env, stat in table.columns]
        return flat.reset_index().to_csv(index=False)
    if fmt == "latex":
        lines = [
            "\\begin{tabular}{ll" + "c" * len(envs) + "}",
            "\\toprule",
            " & ".join(_latex_escape(h) for h in header) + " \\\\",
            "\\midrule",
            *(
                " & ".join(_latex_escape(c) if i < 2 else c for i, c in enumerate(row)) + " \\\\"
                for row in _cells(table, " $\\pm$ ")
            ),
            "\\bottomrule",
            "\\end{tabular}",
            *(f"% {_latex_escape(note)}" for note in legend(table)),
        ]
        return "\n".join(lines) + "\n"
    rows = _cells(table, " ± ")
    if fmt == "html":
        from html import escape

        head = "".join(f"<th>{escape(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows
        )
        notes = "".join(f"<li>{escape(note)}</li>" for note in legend(table))
        return (
            f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            + (f'<ul class="notes">{notes}</ul>' if notes else "")
            + "\n"
        )
    if fmt == "markdown":
        align = ["---", "---"] + ["---:"] * len(envs)
        lines = ["| " + " | ".join(r) + " |" for r in [header, align, *rows]]
        notes = [f"- {note}" for note in legend(table)]
        return "\n".join([*lines, *([""] if notes else []), *notes]) + "\n"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        padded = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    lines += [f"* {note}" for note in legend(table)]
    return "\n".join(lines) + "\n"


def best_single_table(trials: pd.DataFrame) -> pd.DataFrame:
    """``erm`` rows in the ``soups`` layout, from ``trials`` alone.

    Per (dataset, test_env, trial_seed, init): the finished target trial with the best
    ``id_val_acc`` (ties: the smaller ``trial_id``). This is the table to show before
    any soup has been written.
    """
    if trials.empty:
        return pd.DataFrame(columns=SOUP_COLUMNS)
    done = trials[
        (trials["stage"] == "target")
        & trials["status"].str.lower().isin(DONE_STATUSES)
        & trials["id_val_acc"].notna()
        & trials["init"].notna()
    ]
    if done.empty:
        return pd.DataFrame(columns=SOUP_COLUMNS)
    best = (
        done.sort_values(["id_val_acc", "trial_id"], ascending=[False, True], kind="stable")
        .groupby(GROUP, sort=True)
        .head(1)
        .sort_values(GROUP, kind="stable")
        .reset_index(drop=True)
    )
    return pd.DataFrame(
        {
            "sweep": best["sweep"],
            "method": "erm",
            "dataset": best["dataset"],
            "test_env": best["test_env"].astype("int64"),
            "trial_seed": best["trial_seed"].astype("int64"),
            "init": best["init"],
            "n_ingredients": np.ones(len(best), dtype="int64"),
            "ingredients": [[trial_id] for trial_id in best["trial_id"]],
            "id_val_acc": best["id_val_acc"].astype(float),
            "test_acc": best["test_acc"].astype(float),
            "checkpoint": best["checkpoint"],
        },
        columns=SOUP_COLUMNS,
    )


def sweep_table(
    results: dict[str, pd.DataFrame], dataset: str | None = None, fmt: str = "text"
) -> str:
    """The paper table of a sweep's results (as ``load_results`` returns them).

    Soup rows when there are any; before the first soup, the best single model per init.
    """
    soups = results["soups"]
    if soups.empty:
        soups = best_single_table(results["trials"])
    table = mark_undeclared(
        paper_table(soups, dataset=dataset), undeclared_inits(results["trials"])
    )
    return format_table(table, fmt)
