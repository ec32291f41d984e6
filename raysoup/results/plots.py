"""Figures of a sweep's results, as ``matplotlib`` ``Figure`` objects saved to PNG and SVG.

- ``figure_method_bars``: the paper table's ``Avg`` test accuracy ± SE per (method, init);
- ``figure_soup_progress``: greedy soup ID-val accuracy by candidate rank (integers),
  accepted and rejected candidates marked;
- ``figure_id_vs_ood``: ID-val against test accuracy of every trial, with the erm,
  uniform and greedy soups of its init marked (model soups' Figure 1);
- from the ``diagnostics`` dataset (``raysoup diagnose``): ``figure_interpolation`` (the
  curves of one group), ``figure_angle_gain`` (model soups' Figure 3) and
  ``figure_landscape`` (the accuracy plane through theta_0 and the two best trials).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, not
``pyplot``: importing this module never switches the backend of the user's session.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from raysoup.contract import group_slug
from raysoup.io import storage
from raysoup.results.schema import ALL_SEEDS_METHODS, INITS
from raysoup.results.tables import AVG, GROUP, _order

MAX_LEGEND = 12
INIT_COLOURS = {"pretrained": "tab:blue", "ratatouille": "tab:orange", "fusing": "tab:green"}
SOUP_MARKERS = {"erm": "s", "uniform": "*", "greedy": "D"}
CURVES = ("init_to_trial", "trial_to_trial", "soup_to_ingredient")
CURVE_TITLES = {
    "init_to_trial": "init → each trial",
    "trial_to_trial": "between the best trials",
    "soup_to_ingredient": "soup → each ingredient",
}


def _colour(init: str) -> str:
    return INIT_COLOURS.get(init, "tab:gray")


def render(figure: Figure, fmt: str = "png") -> bytes:
    """The figure's bytes as ``png`` (120 dpi) or ``svg``."""
    FigureCanvasAgg(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=120, format=fmt)
    return buffer.getvalue()


def save_figure(figure: Figure, out: str | os.PathLike[str]) -> list[str]:
    """Write ``out`` (its suffix, if any, is replaced) as ``.png`` and ``.svg``, each
    atomically; returns the two paths."""
    stem = Path(out)
    stem = stem.with_suffix("") if stem.suffix in (".png", ".svg") else stem
    written = []
    for fmt in ("png", "svg"):
        path = f"{stem}.{fmt}"
        storage.write_bytes_atomic(path, render(figure, fmt))
        written.append(path)
    return written


def empty_figure(message: str) -> Figure:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    axes.text(0.5, 0.5, message, ha="center", va="center")
    axes.set_axis_off()
    return figure


def _latest_decisions(steps: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A candidate can be re-decided when a better one arrives later: keep its last word."""
    if "decided_at" in steps:
        steps = steps.sort_values("decided_at", kind="stable")
    return steps.drop_duplicates(subset=[*keys, "trial_id"], keep="last")


def figure_soup_progress(soup_steps: pd.DataFrame) -> Figure:
    """Greedy soup ID-val accuracy against candidate rank, one line per group.

    Filled dots are accepted candidates, crosses rejected ones; the thin dotted line is
    each candidate's own ID-val accuracy.
    """
    steps = soup_steps
    if not steps.empty and (steps["method"] == "greedy").any():
        steps = steps[steps["method"] == "greedy"]
    if steps.empty:
        return empty_figure("no soup decisions yet")
    figure = Figure(figsize=(9, 4.8))
    axes = figure.add_subplot()
    keys = [k for k in GROUP if k in steps and steps[k].notna().any()] or ["sweep"]
    steps = _latest_decisions(steps, keys)
    groups = list(steps.groupby(keys, sort=True, dropna=False))
    handles = []
    for name, group in groups:
        group = group.sort_values("rank", kind="stable")
        values = name if isinstance(name, tuple) else (name,)
        label = " ".join(str(v) for v in values)
        (line,) = axes.plot(group["rank"], group["soup_id_val_acc"], label=label)
        handles.append(line)
        colour = line.get_color()
        accepted = group["accepted"].astype(bool)
        axes.plot(group["rank"], group["candidate_id_val_acc"], ":", lw=0.8, color=colour)
        axes.scatter(
            group.loc[accepted, "rank"],
            group.loc[accepted, "soup_id_val_acc"],
            marker="o",
            color=colour,
            zorder=3,
        )
        axes.scatter(
            group.loc[~accepted, "rank"],
            group.loc[~accepted, "soup_id_val_acc"],
            marker="x",
            s=50,
            color=colour,
            zorder=3,
        )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("candidate rank by ID-val accuracy (0 = best, the ERM pick)")
    axes.set_ylabel("soup ID-val accuracy")
    axes.set_title("Greedy soup progress")
    marks = [
        Line2D([], [], marker="o", ls="", color="black", label="accepted"),
        Line2D([], [], marker="x", ls="", color="black", label="rejected"),
        Line2D([], [], ls=":", color="black", label="candidate alone"),
    ]
    shown = handles if len(handles) <= MAX_LEGEND else []
    # Outside the axes, on the right: long group names never hide the lines.
    axes.legend(
        handles=[*marks, *shown],
        fontsize="small",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title=" ".join(keys) if shown else None,
        title_fontsize="small",
    )
    return figure


def figure_method_bars(table: pd.DataFrame) -> Figure:
    """``Avg`` test accuracy ± SE per (method, init), from a ``paper_table``; methods over
    every trial seed (``uniform_all``) have one value and no error bar."""
    if table.empty:
        return empty_figure("no results yet")
    figure = Figure(figsize=(8, 4.5))
    axes = figure.add_subplot()
    methods = list(dict.fromkeys(table.index.get_level_values("method")))
    inits = _order(table.index.get_level_values("init").tolist(), INITS)
    width = 0.8 / len(inits)
    means_all = []
    for j, init in enumerate(inits):
        means, errors = [], []
        for method in methods:
            key = (method, init)
            present = key in table.index
            means.append(table.loc[key, (AVG, "mean")] if present else math.nan)
            errors.append(table.loc[key, (AVG, "se")] if present else math.nan)
        means_all += [m for m in means if not math.isnan(m)]
        x = np.arange(len(methods)) + (j - (len(inits) - 1) / 2) * width
        axes.bar(x, means, width, yerr=errors, capsize=3, label=init, color=_colour(init))
    labels = [f"{m}\n(all seeds, no SE)" if m in ALL_SEEDS_METHODS else m for m in methods]
    axes.set_xticks(np.arange(len(methods)), labels)
    if means_all:  # bars that differ by a point are told apart
        low, high = min(means_all), max(means_all)
        axes.set_ylim(max(0.0, low - max(5.0, (high - low))), min(100.0, high + 2.0))
    axes.set_ylabel("test accuracy, average over test envs (%)")
    dataset = table.attrs.get("dataset")
    axes.set_title(f"{dataset}: mean ± SE over trial seeds" if dataset else "mean ± SE")
    axes.legend(title="init", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def figure_id_vs_ood(trials: pd.DataFrame, soups: pd.DataFrame) -> Figure:
    """ID-val against test accuracy of every finished target trial (dots, coloured by
    init) with the erm, uniform and greedy soups of each group marked."""
    done = trials
    if not done.empty:
        done = done[
            (done["stage"] == "target") & done["id_val_acc"].notna() & done["test_acc"].notna()
        ]
    if done.empty:
        return empty_figure("no finished target trial yet")
    figure = Figure(figsize=(7.5, 5.5))
    axes = figure.add_subplot()
    for init in _order(done["init"].dropna().tolist(), INITS):
        mine = done[done["init"] == init]
        axes.scatter(
            100 * mine["id_val_acc"],
            100 * mine["test_acc"],
            s=18,
            alpha=0.6,
            color=_colour(init),
            label=f"{init}: trials",
        )
    if not soups.empty:
        for method, marker in SOUP_MARKERS.items():
            rows = soups[(soups["method"] == method) & soups["id_val_acc"].notna()]
            for init in _order(rows["init"].dropna().tolist(), INITS):
                mine = rows[rows["init"] == init]
                axes.scatter(
                    100 * mine["id_val_acc"],
                    100 * mine["test_acc"],
                    marker=marker,
                    s=110 if marker == "*" else 60,
                    color=_colour(init),
                    edgecolors="black",
                    linewidths=0.8,
                    zorder=3,
                )
    init_handles = axes.get_legend_handles_labels()[0]
    method_handles = [
        Line2D(
            [],
            [],
            marker=marker,
            ls="",
            color="white",
            markeredgecolor="black",
            markersize=9 if marker == "*" else 7,
            label=method,
        )
        for method, marker in SOUP_MARKERS.items()
    ]
    axes.legend(
        handles=[*init_handles, *method_handles],
        fontsize="small",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    axes.set_xlabel("ID-val accuracy (%)")
    axes.set_ylabel("test (OOD) accuracy (%)")
    axes.set_title("Every trial and soup: ID-val vs OOD test")
    axes.grid(alpha=0.3)
    return figure


def diagnostic_groups(diagnostics: pd.DataFrame) -> list[str]:
    """The group slugs that have diagnostics, sorted."""
    if diagnostics.empty:
        return []
    keys = diagnostics[GROUP].drop_duplicates().itertuples(index=False, name=None)
    return sorted(group_slug(*k) for k in keys)


def _of_group(diagnostics: pd.DataFrame, group: str) -> pd.DataFrame:
    if diagnostics.empty:
        return diagnostics
    keys = diagnostics[GROUP].itertuples(index=False, name=None)
    return diagnostics[[group_slug(*key) == group for key in keys]]


def figure_interpolation(diagnostics: pd.DataFrame, group: str) -> Figure:
    """The interpolation curves of one group: a panel per kind of segment, ID-val accuracy
    solid and test accuracy dashed, one colour per segment."""
    rows = _of_group(diagnostics, group)
    kinds = [k for k in CURVES if not rows.empty and (rows["diagnostic"] == k).any()]
    if not kinds:
        return empty_figure(f"{group}: no interpolation diagnostics")
    figure = Figure(figsize=(4.6 * len(kinds), 4.2))
    for i, kind in enumerate(kinds):
        axes = figure.add_subplot(1, len(kinds), i + 1)
        curves = rows[rows["diagnostic"] == kind]
        for n, (_, curve) in enumerate(curves.groupby(["start", "end"], sort=True)):
            curve = curve.sort_values("a")
            colour = f"C{n % 10}"
            axes.plot(curve["a"], 100 * curve["id_val_acc"], "-", color=colour, lw=1.2)
            axes.plot(curve["a"], 100 * curve["test_acc"], "--", color=colour, lw=1.2)
        start_name = {
            "init_to_trial": "θ0",
            "trial_to_trial": "better",
            "soup_to_ingredient": "soup",
        }[kind]
        end_name = {
            "init_to_trial": "trial",
            "trial_to_trial": "worse",
            "soup_to_ingredient": "ingredient",
        }[kind]
        axes.set_xlabel(f"a: (1 − a)·{start_name} + a·{end_name}")
        axes.set_ylabel("accuracy (%)")
        axes.set_title(CURVE_TITLES[kind], fontsize="medium")
        axes.grid(alpha=0.3)
        if i == 0:
            axes.legend(
                handles=[
                    Line2D([], [], ls="-", color="black", label="ID-val"),
                    Line2D([], [], ls="--", color="black", label="test"),
                ],
                fontsize="small",
            )
    figure.suptitle(group)
    return figure


def figure_angle_gain(diagnostics: pd.DataFrame) -> Figure:
    """Angle between two trials' fine-tuned deltas against the gain of their average over
    the mean of the two (test: filled, ID-val: hollow), per init (model soups' Figure 3)."""
    rows = (
        diagnostics[diagnostics["diagnostic"] == "angle"] if not diagnostics.empty else diagnostics
    )
    if rows.empty:
        return empty_figure("no angle diagnostics (raysoup diagnose)")
    figure = Figure(figsize=(7.5, 5))
    axes = figure.add_subplot()
    for init in _order(rows["init"].dropna().tolist(), INITS):
        mine = rows[rows["init"] == init]
        axes.scatter(
            mine["angle_deg"], 100 * mine["gain_test"], color=_colour(init), label=f"{init}: test"
        )
        axes.scatter(
            mine["angle_deg"],
            100 * mine["gain_id_val"],
            facecolors="none",
            edgecolors=_colour(init),
            label=f"{init}: ID-val",
        )
    axes.axhline(0.0, color="black", lw=0.8)
    axes.set_xlabel("angle between θi − θ0 and θj − θ0 (degrees)")
    axes.set_ylabel("accuracy gain of the pair's average (points)")
    axes.set_title("Angle vs gain of averaging two trials")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.grid(alpha=0.3)
    return figure


def figure_landscape(diagnostics: pd.DataFrame, group: str) -> Figure:
    """Test and ID-val accuracy over the plane through θ0, θ1 (the best trial) and θ2 (the
    second), in units of |θ1 − θ0|."""
    rows = _of_group(diagnostics, group)
    rows = rows[rows["diagnostic"] == "landscape"] if not rows.empty else rows
    grid = rows[rows["point"] >= 0] if not rows.empty else rows
    if grid.empty:
        return empty_figure(f"{group}: no landscape (raysoup diagnose --landscape)")
    marks = rows[rows["point"] < 0]
    figure = Figure(figsize=(10, 4.4))
    for i, (column, title) in enumerate((("id_val_acc", "ID-val"), ("test_acc", "test"))):
        axes = figure.add_subplot(1, 2, i + 1)
        table = grid.pivot_table(index="b", columns="a", values=column)
        contour = axes.contourf(
            table.columns, table.index, 100 * table.to_numpy(), levels=12, cmap="viridis"
        )
        figure.colorbar(contour, ax=axes, label=f"{title} accuracy (%)")
        for mark in marks.itertuples():
            axes.scatter([mark.a], [mark.b], color="white", edgecolors="black", zorder=3)
            axes.annotate(
                str(mark.label).replace("theta_", "θ"),
                (mark.a, mark.b),
                textcoords="offset points",
                xytext=(5, 5),
                color="white",
            )
        axes.set_xlabel("along θ1 − θ0 (units of |θ1 − θ0|)")
        axes.set_ylabel("orthogonal direction")
        axes.set_title(title)
    figure.suptitle(f"{group}: accuracy landscape")
    return figure


# ---------------------------------------------------------------- the two original files


def plot_soup_progress(soup_steps: pd.DataFrame, out_png: str | os.PathLike[str]) -> None:
    """``figure_soup_progress`` written to ``out_png`` (and its ``.svg``)."""
    save_figure(figure_soup_progress(soup_steps), out_png)


def plot_method_bars(table: pd.DataFrame, out_png: str | os.PathLike[str]) -> None:
    """``figure_method_bars`` written to ``out_png`` (and its ``.svg``)."""
    save_figure(figure_method_bars(table), out_png)


def results_figures(
    results: dict[str, pd.DataFrame], dataset: str | None = None
) -> dict[str, Figure]:
    """Every figure of a sweep's results, by file stem (``results --plot``, the report)."""
    from raysoup.results.tables import best_single_table, paper_table

    soups = results["soups"]
    table_rows = soups if not soups.empty else best_single_table(results["trials"])
    figures = {
        "methods": figure_method_bars(paper_table(table_rows, dataset=dataset)),
        "id_vs_ood": figure_id_vs_ood(results["trials"], soups),
        "soup_progress": figure_soup_progress(results["soup_steps"]),
    }
    diagnostics = results.get("diagnostics", pd.DataFrame())
    if not diagnostics.empty:
        figures["angle_gain"] = figure_angle_gain(diagnostics)
        for group in diagnostic_groups(diagnostics):
            figures[f"interpolation-{group}"] = figure_interpolation(diagnostics, group)
            if _of_group(diagnostics, group)["diagnostic"].eq("landscape").any():
                figures[f"landscape-{group}"] = figure_landscape(diagnostics, group)
    return figures
