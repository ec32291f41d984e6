"""Files a newer raysoup wrote are refused with what to do, never half-read: the soup
state (``soup_state.json``) and the sweep record (``sweep.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysoup.errors import BadInputError
from raysoup.io import storage
from raysoup.io.layout import SweepLayout
from raysoup.options import OptionsError
from raysoup.soup.maker import STATE_VERSION, SoupMaker
from raysoup.sweep.config import RECORD_VERSION, parse_record


def test_a_soup_state_of_another_version_is_refused(tmp_path: Path) -> None:
    state = {"version": STATE_VERSION + 1, "sweep": "s", "accept": "ge", "groups": []}
    storage.write_bytes_atomic(SweepLayout(tmp_path).soup_state, json.dumps(state).encode())
    with pytest.raises(BadInputError, match=f"version {STATE_VERSION + 1}.*raysoup soup"):
        SoupMaker(tmp_path, "s")
    state["version"] = STATE_VERSION  # the version it reads
    storage.write_bytes_atomic(SweepLayout(tmp_path).soup_state, json.dumps(state).encode())
    assert SoupMaker(tmp_path, "s").groups == {}


def test_a_sweep_record_of_a_newer_version_is_refused() -> None:
    newer = json.dumps({"version": RECORD_VERSION + 1, "config": {}}).encode()
    with pytest.raises(OptionsError, match=f"record version {RECORD_VERSION + 1}"):
        parse_record(newer, "sweep.json")
    assert parse_record(json.dumps({"version": RECORD_VERSION, "config": {}}).encode(), "x")
    assert parse_record(json.dumps({"config": {}}).encode(), "x")  # version 1: no field
