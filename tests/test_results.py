"""Parquet results: schemas, the store (atomic, idempotent parts), tables and plots."""

from __future__ import annotations

import datetime as dt
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from raysoup.results import (
    CONTRACT_COLUMNS,
    KINDS,
    ResultsStore,
    best_single_table,
    format_table,
    load_results,
    paper_table,
    plot_method_bars,
    plot_soup_progress,
    schema,
    sweep_table,
    validate_rows,
)


def trial_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "sweep": "target",
        "stage": "target",
        "trial_id": "t00",
        "dataset": "PACS",
        "test_env": 0,
        "trial_seed": 0,
        "hparams_seed": 3,
        "init": "fusing",
        "init_sources": ["pretrained", "VLCS/run0"],
        "init_weights": [0.25, 0.75],
        "lr": 5e-5,
        "weight_decay": 0.0,
        "batch_size": 32,
        "resnet_dropout": 0.1,
        "steps": 5001,
        "id_val_acc": 0.8,
        "test_acc": 0.7,
        "env0_in_acc": 0.9,
        "env0_out_acc": 0.85,
        "env1_in_acc": 0.95,
        "env1_out_acc": 0.9,
        "checkpoint": "/ckpt/t00",
        "status": "done",
        "wall_s": 12.5,
    }
    row.update(overrides)
    return row


def step_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "sweep": "target",
        "method": "greedy",
        "trial_id": "t00",
        "rank": 0,
        "candidate_id_val_acc": 0.8,
        "accepted": True,
        "soup_size": 1,
        "soup_id_val_acc": 0.8,
        "decided_at": dt.datetime(2025, 1, 1, 12, tzinfo=dt.timezone.utc),
        "dataset": "PACS",
        "test_env": 0,
        "trial_seed": 0,
        "init": "pretrained",
    }
    row.update(overrides)
    return row


def soup_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "sweep": "target",
        "method": "greedy",
        "dataset": "PACS",
        "test_env": 0,
        "trial_seed": 0,
        "init": "pretrained",
        "n_ingredients": 2,
        "ingredients": ["t00", "t01"],
        "id_val_acc": 0.81,
        "test_acc": 0.72,
        "checkpoint": "/ckpt/soup",
    }
    row.update(overrides)
    return row


# ---------------------------------------------------------------- store


def diagnostic_row(**overrides: Any) -> dict[str, Any]:
    row = {
        "sweep": "s",
        "diagnostic": "trial_to_trial",
        "dataset": "PACS",
        "test_env": 0,
        "trial_seed": 0,
        "init": "pretrained",
        "start": "t00",
        "end": "t01",
        "point": 0,
        "a": 0.0,
        "id_val_acc": 0.8,
        "id_val_loss": 0.5,
        "test_acc": 0.7,
        "test_loss": 0.9,
        "part": "PACS-e0-s0-pretrained-trial-to-trial",
        "signature": "0" * 64,
    }
    row.update(overrides)
    return row


def test_round_trip_of_every_kind(tmp_path: Path) -> None:
    root = tmp_path / "run" / "results"
    store = ResultsStore(root)
    rows = {
        "trials": [trial_row(), trial_row(trial_id="t01", init="pretrained", test_acc=math.nan)],
        "soup_steps": [step_row(), step_row(trial_id="t01", rank=1, accepted=False)],
        "soups": [soup_row(), soup_row(method="uniform")],
        "diagnostics": [
            diagnostic_row(),
            diagnostic_row(
                diagnostic="angle", a=0.5, angle_deg=41.5, gain_id_val=0.01, gain_test=math.nan
            ),
        ],
    }
    assert set(rows) == set(KINDS)
    for kind, kind_rows in rows.items():
        written = store.append(kind, kind_rows, part_key="p0")
        assert written == str(root / kind / "part-p0.parquet")
    frames = store.read_all()
    for kind in KINDS:
        frame = frames[kind]
        assert set(CONTRACT_COLUMNS[kind]) <= set(frame.columns)
        assert len(frame) == 2
        # Plain pandas on the folder reads the same rows: the user-facing contract.
        direct = pd.read_parquet(root / kind)
        assert set(CONTRACT_COLUMNS[kind]) <= set(direct.columns)
        assert len(direct) == 2
    trials = frames["trials"]
    assert list(trials["init_sources"][0]) == ["pretrained", "VLCS/run0"]
    assert list(trials["init_weights"][0]) == [0.25, 0.75]
    assert trials["test_env"].dtype == np.int64
    assert math.isnan(trials["test_acc"][1])
    assert trials["env5_out_acc"].isna().all()  # padded to 6 envs
    steps = frames["soup_steps"]
    assert steps["decided_at"][0] == pd.Timestamp("2025-01-01 12:00", tz="UTC")
    assert steps["accepted"].tolist() == [True, False]
    assert list(frames["soups"]["ingredients"][0]) == ["t00", "t01"]
    # Both spellings of the location work.
    for path in (tmp_path / "run", root):
        assert len(load_results(path)["soups"]) == 2


def test_empty_store_reads_typed_empty_frames(tmp_path: Path) -> None:
    frames = ResultsStore(tmp_path / "results").read_all()
    for kind in KINDS:
        assert frames[kind].empty
        assert list(frames[kind].columns) == schema(kind).names
    assert ResultsStore(tmp_path).append("soups", [], part_key="nothing") is None
    assert not (tmp_path / "soups").exists()


def test_same_part_key_replaces_instead_of_duplicating(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.append("soups", [soup_row(test_acc=0.5)], part_key="PACS-0-0-greedy")
    store.append("soups", [soup_row(method="uniform")], part_key="PACS-0-0-uniform")
    store.append("soups", [soup_row(test_acc=0.6)], part_key="PACS-0-0-greedy")
    soups = store.read("soups").sort_values("method")
    assert soups["method"].tolist() == ["greedy", "uniform"]
    assert soups["test_acc"].tolist() == [0.6, 0.72]
    assert len(pd.read_parquet(tmp_path / "soups")) == 2
    store.append("soups", [], part_key="PACS-0-0-uniform")  # no rows: the part is gone
    assert store.read("soups")["method"].tolist() == ["greedy"]


def test_half_written_temp_files_are_ignored(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.append("trials", [trial_row()], part_key="t00")
    folder = tmp_path / "trials"
    # What a writer killed mid-write leaves behind, and what one still writing shows.
    (folder / ".part-t01.parquet.tmp-0123").write_bytes(b"PAR1\x00\x00half a file")
    (folder / "_part-t02.parquet").write_bytes(b"PAR1")
    assert store.read("trials")["trial_id"].tolist() == ["t00"]
    assert pd.read_parquet(folder)["trial_id"].tolist() == ["t00"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("part-")) == [
        "part-t00.parquet"
    ]


def test_parts_with_different_env_counts_read_as_one_table(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.append("trials", [trial_row(trial_id="a")], part_key="a")
    store.append(
        "trials", [trial_row(trial_id="b", env6_in_acc=0.5, content_hash="ab12")], part_key="b"
    )
    trials = store.read("trials").set_index("trial_id")
    assert trials.loc["b", "env6_in_acc"] == 0.5
    assert math.isnan(trials.loc["a", "env6_in_acc"])
    assert trials.loc["b", "content_hash"] == "ab12"


def test_store_on_a_uri_filesystem() -> None:
    store = ResultsStore("mock:///bucket/run/results")
    path = store.append("soups", [soup_row()], part_key="g")
    assert path == "mock:///bucket/run/results/soups/part-g.parquet"
    store.append("soups", [soup_row(test_acc=0.1)], part_key="g")
    assert store.read("soups")["test_acc"].tolist() == [0.1]
    assert store.part_files("soups") == ["bucket/run/results/soups/part-g.parquet"]


def test_bad_part_keys_and_kinds_are_refused(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    for key in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="part_key"):
            store.append("soups", [soup_row()], part_key=key)
    with pytest.raises(ValueError, match="unknown results dataset 'soup'"):
        store.append("soup", [soup_row()], part_key="x")
    with pytest.raises(ValueError, match=r"soups.*'test_acc'"):
        store.append("soups", [soup_row(test_acc=1.5)], part_key="x")
    assert not (tmp_path / "soups").exists()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kind", "row", "message"),
    [
        (
            "trials",
            {k: v for k, v in trial_row().items() if k != "dataset"},
            "'dataset' is required",
        ),
        ("trials", trial_row(stage="pretrain"), r"'stage'.*one of.*'pretrain'"),
        ("trials", trial_row(init="soup"), r"'init'.*one of.*'soup'"),
        ("trials", trial_row(init=None), "'init' is required for stage 'target'"),
        ("trials", trial_row(test_env="0"), r"'test_env'.*type int64.*'0'"),
        ("trials", trial_row(batch_size=True), r"'batch_size'.*int64.*True"),
        ("trials", trial_row(id_val_acc=80.0), r"'id_val_acc'.*\[0, 1\].*80.0"),
        ("trials", trial_row(id_val_acc=math.nan), r"'id_val_acc'.*NaN only.*nan"),
        ("trials", trial_row(env3_out_acc=-0.1), r"'env3_out_acc'.*\[0, 1\].*-0.1"),
        ("trials", trial_row(init_sources="pretrained"), r"'init_sources'.*list<item: string>"),
        ("soup_steps", step_row(accepted="yes"), r"soup_steps: .*'accepted'.*bool.*'yes'"),
        ("soup_steps", step_row(decided_at=12), r"'decided_at'.*timestamp.*12"),
        ("soups", soup_row(method="best"), r"soups: .*'method'.*one of.*'best'"),
        ("soups", soup_row(trial_seed=None), r"'trial_seed' must not be null"),
        ("soups", soup_row(id_val_acc=math.nan), r"'id_val_acc'.*NaN only for.*uniform_all"),
        ("soups", soup_row(method="uniform_all"), r"'trial_seed' must be -1 exactly.*got 0"),
        ("soups", soup_row(trial_seed=-1), r"'trial_seed' must be -1 exactly.*'greedy'"),
    ],
)
def test_validation_names_kind_column_and_value(kind: str, row: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_rows(kind, [row])


def test_validation_accepts_nan_test_acc_and_naive_utc_times() -> None:
    assert math.isnan(validate_rows("soups", [soup_row(test_acc=math.nan)])["test_acc"][0].as_py())
    every_seed = soup_row(method="uniform_all", trial_seed=-1, id_val_acc=math.nan)
    ensemble = soup_row(method="ensemble", checkpoint=None)
    table = validate_rows("soups", [every_seed, ensemble])
    assert math.isnan(table["id_val_acc"][0].as_py()) and table["checkpoint"][1].as_py() is None
    naive = validate_rows("soup_steps", [step_row(decided_at=dt.datetime(2025, 1, 1))])
    assert naive["decided_at"][0].as_py() == dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    lp = validate_rows("trials", [trial_row(stage="lp", init=None, test_acc=None)])
    assert lp["init"][0].as_py() is None
    numpy_ints = validate_rows("trials", [trial_row(test_env=np.int64(2))])
    assert numpy_ints["test_env"][0].as_py() == 2


# ---------------------------------------------------------------- tables

ACCS = {  # (test_env, trial_seed) -> test_acc for greedy/pretrained
    (0, 0): 0.60,
    (0, 1): 0.70,
    (0, 2): 0.65,
    (1, 0): 0.80,
    (1, 1): 0.90,
    (1, 2): 0.85,
}


def example_soups() -> pd.DataFrame:
    rows = [soup_row(test_env=e, trial_seed=s, test_acc=a) for (e, s), a in ACCS.items()]
    rows += [  # erm/ratatouille: seed 2 lacks env 1, so Avg uses seeds 0 and 1 only
        soup_row(method="erm", init="ratatouille", test_env=0, trial_seed=0, test_acc=0.5),
        soup_row(method="erm", init="ratatouille", test_env=0, trial_seed=1, test_acc=0.6),
        soup_row(method="erm", init="ratatouille", test_env=0, trial_seed=2, test_acc=0.7),
        soup_row(method="erm", init="ratatouille", test_env=1, trial_seed=0, test_acc=0.7),
        soup_row(method="erm", init="ratatouille", test_env=1, trial_seed=1, test_acc=0.8),
        soup_row(method="uniform", init="fusing", test_env=1, trial_seed=0, test_acc=0.75),
    ]
    return pd.DataFrame(rows)


def test_paper_table_matches_a_hand_computation() -> None:
    table = paper_table(example_soups())
    assert list(table.index) == [
        ("erm", "ratatouille"),
        ("uniform", "fusing"),
        ("greedy", "pretrained"),
    ]
    assert list(dict.fromkeys(table.columns.get_level_values(0))) == ["0", "1", "Avg"]
    greedy = table.loc[("greedy", "pretrained")]
    # env 0: 60, 70, 65 -> mean 65, std (ddof=0) sqrt(50/3), SE = std / sqrt(3)
    se0 = math.sqrt(((60 - 65) ** 2 + (70 - 65) ** 2 + 0) / 3) / math.sqrt(3)
    assert greedy[("0", "mean")] == pytest.approx(65.0)
    assert greedy[("0", "se")] == pytest.approx(se0)
    assert greedy[("1", "mean")] == pytest.approx(85.0)
    assert greedy[("1", "se")] == pytest.approx(se0)
    # Avg per seed: 70, 80, 75 -> mean 75, same spread as env 0
    assert greedy[("Avg", "mean")] == pytest.approx(75.0)
    assert greedy[("Avg", "se")] == pytest.approx(se0)
    erm = table.loc[("erm", "ratatouille")]
    assert erm[("0", "mean")] == pytest.approx(60.0)
    assert erm[("Avg", "mean")] == pytest.approx(65.0)  # seeds 0, 1: (60 + 70) / 2
    assert erm[("Avg", "se")] == pytest.approx(5.0 / math.sqrt(2))
    uniform = table.loc[("uniform", "fusing")]
    assert math.isnan(uniform[("0", "mean")])
    assert uniform[("1", "se")] == 0.0  # one seed: ± 0.0
    assert math.isnan(uniform[("Avg", "mean")])


def test_paper_table_dataset_choice_and_env_names() -> None:
    soups = pd.concat([example_soups(), pd.DataFrame([soup_row(dataset="VLCS")])])
    with pytest.raises(ValueError, match=r"several datasets \['PACS', 'VLCS'\]"):
        paper_table(soups)
    with pytest.raises(ValueError, match="no results for dataset 'OfficeHome'"):
        paper_table(soups, dataset="OfficeHome")
    named = paper_table(soups, dataset="PACS", env_names=["A", "C", "P", "S"])
    assert list(dict.fromkeys(named.columns.get_level_values(0))) == ["A", "C", "P", "S", "Avg"]
    assert math.isnan(named.loc[("greedy", "pretrained"), ("Avg", "mean")])  # no seed has P, S
    assert paper_table(soups, dataset="VLCS").shape == (1, 4)


def test_paper_table_refuses_conflicting_duplicates() -> None:
    soups = example_soups()
    assert paper_table(pd.concat([soups, soups.iloc[:1]])).equals(paper_table(soups))
    clash = pd.concat([soups, pd.DataFrame([soup_row(test_acc=0.1)])])
    with pytest.raises(ValueError, match=r"different test_acc.*trial_seed=0"):
        paper_table(clash)


def test_format_table_in_every_format() -> None:
    table = paper_table(example_soups())
    text = format_table(table, "text")
    assert "65.0 ± 2.4" in text and "75.0 ± 2.4" in text and " X" in text
    markdown = format_table(table, "markdown")
    assert markdown.splitlines()[0] == "| method | init | 0 | 1 | Avg |"
    assert "| greedy | pretrained | 65.0 ± 2.4 | 85.0 ± 2.4 | 75.0 ± 2.4 |" in markdown
    csv = format_table(table, "csv")
    assert csv.splitlines()[0] == "method,init,0_mean,0_se,1_mean,1_se,Avg_mean,Avg_se"
    parsed = pd.read_csv(io.StringIO(csv)).set_index(["method", "init"])
    assert parsed.loc[("greedy", "pretrained"), "Avg_mean"] == pytest.approx(75.0)
    latex = format_table(table, "latex")
    assert "greedy & pretrained & 65.0 $\\pm$ 2.4 & 85.0 $\\pm$ 2.4 & 75.0 $\\pm$ 2.4 \\\\" in latex
    assert latex.startswith("\\begin{tabular}{llccc}")
    html = format_table(table, "html")
    assert html.startswith('<table class="results"><thead><tr><th>method</th>')
    assert "<td>greedy</td><td>pretrained</td><td>65.0 ± 2.4</td>" in html
    assert html.count("<tr>") == 1 + len(table)
    with pytest.raises(ValueError, match=r"'pdf'.*text.*markdown.*csv.*latex.*html"):
        format_table(table, "pdf")


def test_best_single_table_feeds_paper_table() -> None:
    trials = pd.DataFrame(
        [
            trial_row(trial_id="t2", id_val_acc=0.9, test_acc=0.5),
            trial_row(trial_id="t1", id_val_acc=0.9, test_acc=0.6),  # tie: smaller id wins
            trial_row(trial_id="t0", id_val_acc=0.95, test_acc=0.1, status="error"),
            trial_row(trial_id="t3", id_val_acc=0.99, stage="aux", init="pretrained"),
            trial_row(trial_id="t4", id_val_acc=0.7, test_acc=0.4, trial_seed=1),
        ]
    )
    erm = best_single_table(trials)
    assert erm["ingredients"].map(list).tolist() == [["t1"], ["t4"]]
    assert (erm["method"] == "erm").all() and (erm["n_ingredients"] == 1).all()
    validate_rows("soups", erm.to_dict("records"))  # the soups layout, exactly
    table = paper_table(erm)
    assert table.loc[("erm", "fusing"), ("0", "mean")] == pytest.approx(50.0)
    assert table.loc[("erm", "fusing"), ("0", "se")] == pytest.approx(10.0 / math.sqrt(2))
    assert best_single_table(trials.iloc[:0]).empty


def test_sweep_table_prefers_soups_over_best_single_models() -> None:
    trials = pd.DataFrame([trial_row(trial_id="t1", id_val_acc=0.9, test_acc=0.6)])
    before = sweep_table({"trials": trials, "soups": pd.DataFrame()}, fmt="csv")
    assert "erm" in before and "greedy" not in before
    soups = pd.DataFrame([soup_row(method="greedy", test_acc=0.75)])
    after = sweep_table({"trials": trials, "soups": soups}, fmt="csv")
    assert "greedy" in after and "75.0" in after and "erm" not in after


def test_empty_results_give_an_empty_table() -> None:
    table = paper_table(pd.DataFrame(columns=schema("soups").names))
    assert table.empty
    assert "method" in format_table(table, "text")


def test_uniform_all_and_ensemble_rows_follow_greedy_and_uniform_all_has_no_se(
    tmp_path: Path,
) -> None:
    every_seed = {"method": "uniform_all", "trial_seed": -1, "id_val_acc": math.nan}
    extra = [
        soup_row(**every_seed, test_env=0, test_acc=0.66),
        soup_row(**every_seed, test_env=1, test_acc=0.86),
        *(
            soup_row(method="ensemble", checkpoint=None, test_env=e, trial_seed=t, test_acc=a)
            for (e, t), a in {(0, 0): 0.6, (0, 1): 0.7, (1, 0): 0.8, (1, 1): 0.9}.items()
        ),
    ]
    soups = pd.concat([example_soups(), pd.DataFrame(extra)], ignore_index=True)
    validate_rows("soups", extra)
    table = paper_table(soups)
    assert list(table.index)[2:] == [
        ("greedy", "pretrained"),
        ("uniform_all", "pretrained"),
        ("ensemble", "pretrained"),
    ]
    everything = table.loc[("uniform_all", "pretrained")]
    assert everything[("0", "mean")] == pytest.approx(66.0)
    assert everything[("Avg", "mean")] == pytest.approx(76.0)
    assert all(math.isnan(everything[(env, "se")]) for env in ("0", "1", "Avg"))
    assert table.loc[("ensemble", "pretrained"), ("Avg", "se")] == pytest.approx(5 / 2**0.5)
    text = format_table(table, "text")
    assert re.search(r"^uniform_all\s+pretrained\s+66\.0\s+86\.0\s+76\.0$", text, re.M), text
    assert "uniform_all: one uniform soup of every trial seed" in text.splitlines()[-2]
    assert "no SE over seeds" in text and "ensemble: logit average" in text
    assert "- uniform_all: one uniform soup" in format_table(table, "markdown")
    assert "% uniform\\_all: one uniform soup" in format_table(table, "latex")
    csv = pd.read_csv(io.StringIO(format_table(table, "csv"))).set_index(["method", "init"])
    assert math.isnan(csv.loc[("uniform_all", "pretrained"), "Avg_se"])
    assert "uniform_all" not in format_table(paper_table(example_soups()), "text")
    plot_method_bars(table, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > 1000


# ---------------------------------------------------------------- plots


def test_plots_write_pngs(tmp_path: Path) -> None:
    steps = pd.DataFrame(
        [
            step_row(trial_id="a", rank=0, accepted=True, soup_size=1, soup_id_val_acc=0.8),
            step_row(trial_id="b", rank=1, accepted=False, soup_size=1, soup_id_val_acc=0.8),
            step_row(trial_id="c", rank=2, accepted=True, soup_size=2, soup_id_val_acc=0.82),
            step_row(trial_id="a", rank=0, init="fusing"),
        ]
    )
    for frame, name in ((steps, "progress.png"), (steps.iloc[:0], "empty.png")):
        plot_soup_progress(frame, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_method_bars(paper_table(example_soups()), tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > 1000


# ---------------------------------------------------------------- figures and the report


def _diagnosed_results(root: Path) -> None:
    """A results folder with trials, soups, greedy steps and every kind of diagnostic."""
    store = ResultsStore(root / "results")
    store.append("trials", [trial_row(), trial_row(trial_id="t01", id_val_acc=0.7)], "t")
    store.append("soups", [soup_row(), soup_row(method="uniform"), soup_row(method="erm")], "s")
    store.append("soup_steps", [step_row(), step_row(trial_id="t01", rank=1, accepted=False)], "g")
    init = {"init": "fusing"}
    rows = [
        diagnostic_row(**init, diagnostic=kind, start=start, end="t01", point=i, a=i / 2)
        for kind, start in (("init_to_trial", "init:t01"), ("trial_to_trial", "t00"))
        for i in range(3)
    ]
    rows.append(
        diagnostic_row(
            **init, diagnostic="angle", a=0.5, angle_deg=30.0, gain_id_val=0.01, gain_test=0.02
        )
    )
    rows += [
        diagnostic_row(**init, diagnostic="landscape", point=j * 2 + i, a=float(i), b=float(j))
        for i in range(2)
        for j in range(2)
    ]
    rows.append(
        diagnostic_row(**init, diagnostic="landscape", point=-1, a=1.0, b=0.0, label="theta_1")
    )
    store.append("diagnostics", rows, "d")


def test_every_figure_is_drawn_and_saved_as_png_and_svg(tmp_path: Path) -> None:
    from raysoup.results.plots import results_figures, save_figure

    _diagnosed_results(tmp_path / "run")
    figures = results_figures(load_results(tmp_path / "run"))
    group = "PACS-e0-s0-fusing"
    assert set(figures) == {
        "methods",
        "id_vs_ood",
        "soup_progress",
        "angle_gain",
        f"interpolation-{group}",
        f"landscape-{group}",
    }
    for stem, figure in figures.items():
        png, svg = save_figure(figure, tmp_path / "plots" / f"{stem}.png")
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in Path(svg).read_bytes()[:500]
    progress = figures["soup_progress"].axes[0]
    assert all(float(t).is_integer() for t in progress.get_xticks())  # integer ranks
    labels = [t.get_text() for t in progress.get_legend().get_texts()]
    assert {"accepted", "rejected"} <= set(labels)


def test_report_is_one_self_contained_page(tmp_path: Path) -> None:
    from raysoup.results.report import report_html, write_report

    run = tmp_path / "run"
    ResultsStore(run / "results").append("trials", [trial_row()], "t")
    early = report_html(run)  # mid-sweep: no soups, no diagnostics yet
    assert early.count("data:image/png;base64,") == 3 and "none yet" in early
    _diagnosed_results(run)
    out = write_report(run, tmp_path / "report.html")
    page = Path(out).read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<img ") == page.count("data:image/png;base64,") == 6
    assert page.count("<table") == 3  # methods, diagnostics summary, trials
    assert "<script" not in page and 'src="http' not in page and "href=" not in page
    assert "PACS-e0-s0-fusing" in page
