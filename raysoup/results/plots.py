"""Two quick figures from the results, written as PNG.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, not
``pyplot``: importing this module never switches the backend of the user's session.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from raysoup.io import storage
from raysoup.results.schema import ALL_SEEDS_METHODS, INITS
from raysoup.results.tables import AVG, GROUP, _order

MAX_LEGEND = 12


def _save(figure: Figure, out_png: str | os.PathLike[str]) -> None:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=120, format="png")
    storage.write_bytes_atomic(os.fspath(out_png), buffer.getvalue())


def _latest_decisions(steps: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A candidate can be re-decided when a better one arrives later: keep its last word."""
    if "decided_at" in steps:
        steps = steps.sort_values("decided_at", kind="stable")
    return steps.drop_duplicates(subset=[*keys, "trial_id"], keep="last")


def plot_soup_progress(soup_steps: pd.DataFrame, out_png: str | os.PathLike[str]) -> None:
    """Greedy soup ID-val accuracy against candidate rank, one line per group.

    Filled dots are accepted candidates, crosses rejected ones; the thin dotted line is
    each candidate's own ID-val accuracy.
    """
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    steps = soup_steps
    if not steps.empty and (steps["method"] == "greedy").any():
        steps = steps[steps["method"] == "greedy"]
    if steps.empty:
        axes.text(0.5, 0.5, "no soup decisions yet", ha="center", va="center")
        axes.set_axis_off()
        _save(figure, out_png)
        return
    keys = [k for k in GROUP if k in steps and steps[k].notna().any()] or ["sweep"]
    steps = _latest_decisions(steps, keys)
    groups = list(steps.groupby(keys, sort=True, dropna=False))
    for name, group in groups:
        group = group.sort_values("rank", kind="stable")
        values = name if isinstance(name, tuple) else (name,)
        label = " ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        (line,) = axes.plot(group["rank"], group["soup_id_val_acc"], label=label)
        accepted = group["accepted"].astype(bool)
        axes.plot(group["rank"], group["candidate_id_val_acc"], ":", lw=0.8, color=line.get_color())
        axes.scatter(
            group.loc[accepted, "rank"],
            group.loc[accepted, "soup_id_val_acc"],
            marker="o",
            color=line.get_color(),
        )
        axes.scatter(
            group.loc[~accepted, "rank"],
            group.loc[~accepted, "soup_id_val_acc"],
            marker="x",
            color=line.get_color(),
        )
    axes.set_xlabel("candidate rank (by ID-val accuracy)")
    axes.set_ylabel("soup ID-val accuracy")
    axes.set_title("Greedy soup progress")
    if len(groups) <= MAX_LEGEND:
        axes.legend(fontsize="small")
    _save(figure, out_png)


def plot_method_bars(table: pd.DataFrame, out_png: str | os.PathLike[str]) -> None:
    """``Avg`` test accuracy ± SE per (method, init), from a ``paper_table``; methods over
    every trial seed (``uniform_all``) have one value and no error bar."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    if table.empty:
        axes.text(0.5, 0.5, "no results yet", ha="center", va="center")
        axes.set_axis_off()
        _save(figure, out_png)
        return
    methods = list(dict.fromkeys(table.index.get_level_values("method")))
    inits = _order(table.index.get_level_values("init").tolist(), INITS)
    width = 0.8 / len(inits)
    for j, init in enumerate(inits):
        means, errors = [], []
        for method in methods:
            key = (method, init)
            present = key in table.index
            means.append(table.loc[key, (AVG, "mean")] if present else math.nan)
            errors.append(table.loc[key, (AVG, "se")] if present else math.nan)
        x = np.arange(len(methods)) + (j - (len(inits) - 1) / 2) * width
        axes.bar(x, means, width, yerr=errors, capsize=3, label=init)
    labels = [f"{m}\n(all seeds, no SE)" if m in ALL_SEEDS_METHODS else m for m in methods]
    axes.set_xticks(np.arange(len(methods)), labels)
    axes.set_ylabel("test accuracy, average over test envs (%)")
    dataset = table.attrs.get("dataset")
    axes.set_title(f"{dataset}: mean ± SE over trial seeds" if dataset else "mean ± SE")
    axes.legend(title="init", fontsize="small")
    _save(figure, out_png)
