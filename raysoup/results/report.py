"""``raysoup report``: one self-contained HTML page of a sweep's results.

The page holds the paper table, the trials, the diagnostics summary (when ``raysoup
diagnose`` has run) and every figure of ``plots.results_figures`` as a PNG data URI, with
inline CSS: no script, no network, no server; it opens from a mail attachment.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from html import escape

import pandas as pd
from matplotlib.figure import Figure

from raysoup.io import storage
from raysoup.results.plots import render, results_figures
from raysoup.results.store import load_results
from raysoup.results.tables import best_single_table, format_table, paper_table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, td:nth-child(2) { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .meta { color: #555; font-size: 0.9em; }
"""

CAPTIONS = {
    "methods": "Test accuracy (average over test envs) per method and init, mean ± SE over "
    "trial seeds.",
    "id_vs_ood": "ID-val against OOD test accuracy of every trial; the erm, uniform and "
    "greedy soups of each group marked (model soups' Figure 1).",
    "soup_progress": "Greedy soup: the soup's ID-val accuracy as candidates are tried in "
    "rank order; accepted and rejected candidates marked.",
    "angle_gain": "Angle between two trials' fine-tuned deltas against the accuracy gain of "
    "their average over the mean of the two (model soups' Figure 3).",
    "interpolation": "Accuracy along straight lines in weight space: from each trial's init, "
    "between the best trials, from each soup to its ingredients.",
    "landscape": "Accuracy over the plane through θ0, the best trial θ1 and the second θ2.",
}


def _frame_html(frame: pd.DataFrame, floats: str = "{:.4f}") -> str:
    if frame.empty:
        return "<p>none</p>"
    head = "".join(f"<th>{escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for value in row:
            text = floats.format(value) if isinstance(value, float) else str(value)
            cells.append(f"<td>{escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _trials_table(trials: pd.DataFrame) -> pd.DataFrame:
    if trials.empty:
        return trials
    target = trials[trials["stage"] == "target"].copy()
    columns = [
        c
        for c in (
            "trial_id",
            "init",
            "test_env",
            "trial_seed",
            "hparams_seed",
            "lr",
            "status",
            "id_val_acc",
            "test_acc",
        )
        if c in target
    ]
    return target.sort_values(["init", "id_val_acc"], ascending=[True, False])[columns]


def _chord(curve: pd.DataFrame) -> pd.Series:
    """The straight line between a curve's two ends' test accuracies, at each ``a``."""
    first, last = curve["test_acc"].iloc[0], curve["test_acc"].iloc[-1]
    return (1 - curve["a"]) * first + curve["a"] * last


def _diagnostics_summary(diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Per group: the mean angle between deltas and the mean gain of pair averages, and the
    largest test-accuracy barrier between two trials: how far a curve falls below the
    straight line between its ends (0 when it never does)."""
    if diagnostics.empty:
        return diagnostics
    rows = []
    keys = ["dataset", "test_env", "trial_seed", "init"]
    for key, group in diagnostics.groupby(keys, sort=True):
        angles = group[group["diagnostic"] == "angle"]
        pairs = group[group["diagnostic"] == "trial_to_trial"]
        barrier = float("nan")
        if not pairs.empty:  # Frankle et al.'s barrier: the dip below the ends' chord
            barrier = max(
                float((_chord(c) - c["test_acc"]).max())
                for _, c in pairs.sort_values("a").groupby(["start", "end"])
            )
        rows.append(
            {
                "group": f"{key[0]}-e{key[1]}-s{key[2]}-{key[3]}",
                "pairs": len(angles),
                "mean angle (deg)": float(angles["angle_deg"].mean())
                if len(angles)
                else float("nan"),
                "mean gain test (pts)": 100 * float(angles["gain_test"].mean())
                if len(angles)
                else float("nan"),
                "mean gain ID-val (pts)": 100 * float(angles["gain_id_val"].mean())
                if len(angles)
                else float("nan"),
                "max test barrier (pts)": 100 * barrier,
            }
        )
    return pd.DataFrame(rows)


def _figure_html(stem: str, figure: Figure) -> str:
    data = base64.b64encode(render(figure, "png")).decode("ascii")
    kind, _, group = stem.partition("-")
    caption = CAPTIONS.get(kind, "") + (f" ({group})" if group else "")
    return (
        f'<figure id="{escape(stem)}"><img alt="{escape(stem)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{escape(caption)}</figcaption></figure>'
    )


def report_html(path: str | os.PathLike[str], dataset: str | None = None) -> str:
    """The report of the sweep at ``path`` (``<storage>/<name>``, local or URI) as HTML."""
    results = load_results(path)
    trials, soups = results["trials"], results["soups"]
    table_rows = soups if not soups.empty else best_single_table(trials)
    table = paper_table(table_rows, dataset=dataset)
    name = os.fspath(path).rstrip("/").rsplit("/", 1)[-1]
    done = int((trials["status"] == "done").sum()) if not trials.empty else 0
    failed = int((trials["status"] == "failed").sum()) if not trials.empty else 0
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>raysoup report: {escape(name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>raysoup report: {escape(name)}</h1>",
        f'<p class="meta">{escape(os.fspath(path))} · {done} runs done, {failed} failed · '
        f"written {stamp}</p>",
        "<h2>Methods</h2>",
        format_table(table, "html") if not table.empty else "<p>no results yet</p>",
    ]
    figures = results_figures(results, dataset=dataset)
    diagnostics = results.get("diagnostics", pd.DataFrame())
    main = [stem for stem in figures if stem in ("methods", "id_vs_ood", "soup_progress")]
    parts += [_figure_html(stem, figures[stem]) for stem in main]
    parts.append("<h2>Diagnostics</h2>")
    if diagnostics.empty:
        parts.append("<p>none yet: <code>raysoup diagnose PATH</code> computes them</p>")
    else:
        parts.append(_frame_html(_diagnostics_summary(diagnostics), "{:.2f}"))
        parts += [_figure_html(stem, fig) for stem, fig in figures.items() if stem not in main]
    parts += ["<h2>Target trials</h2>", _frame_html(_trials_table(trials)), "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(
    path: str | os.PathLike[str], out: str | os.PathLike[str], dataset: str | None = None
) -> str:
    """Write ``report_html(path)`` to ``out`` atomically; returns ``out``."""
    storage.write_bytes_atomic(os.fspath(out), report_html(path, dataset).encode("utf-8"))
    return os.fspath(out)
