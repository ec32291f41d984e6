"""Parquet results (``trials``, ``soup_steps``, ``soups``) and the tables made from them.

The plots are imported on first use, so writers (the trial loop, the soup actor) do not
pay for importing matplotlib.
"""

from typing import Any

from raysoup.results.schema import (
    CONTRACT_COLUMNS,
    INITS,
    KINDS,
    METHODS,
    STAGES,
    schema,
    validate_rows,
)
from raysoup.results.store import ResultsStore, load_results
from raysoup.results.tables import (
    FORMATS,
    best_single_table,
    format_table,
    mean_se,
    paper_table,
    sweep_table,
)

__all__ = [
    "CONTRACT_COLUMNS",
    "FORMATS",
    "INITS",
    "KINDS",
    "METHODS",
    "STAGES",
    "ResultsStore",
    "best_single_table",
    "format_table",
    "load_results",
    "mean_se",
    "paper_table",
    "plot_method_bars",
    "plot_soup_progress",
    "schema",
    "sweep_table",
    "validate_rows",
]


def __getattr__(name: str) -> Any:
    if name in ("plot_method_bars", "plot_soup_progress"):
        from raysoup.results import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
