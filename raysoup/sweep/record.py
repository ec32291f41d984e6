"""A sweep folder's config record (``SweepLayout.record``): written on the first run,
read back on every later one, and a different config under the same name refused."""

from __future__ import annotations

import json
import sys

from raysoup.io import storage as io_storage
from raysoup.io.layout import RECORD, SweepLayout
from raysoup.io.storage import Location
from raysoup.options import OptionsError
from raysoup.sweep.config import (
    ADDED_LATER,
    RECORD_VERSION,
    RUN_KNOBS,
    SweepConfig,
    adopt_record,
    config_from_record,
    parse_record,
)


def read_config(root: Location) -> SweepConfig:
    """The config a sweep under ``root`` was started with."""
    path = SweepLayout(root).record
    if not io_storage.exists(path):
        raise FileNotFoundError(f"{root} holds no sweep: {RECORD} is missing")
    return config_from_record(parse_record(io_storage.read_bytes(path), str(path)), str(path))


def record_config(root: Location, config: SweepConfig) -> SweepConfig:
    """Write the config on first run; refuse a different config under the same name.

    Returns the config to run: ``config`` itself, except when resuming a sweep recorded
    before ``RECORD_VERSION`` 2, which keeps the behaviour it was started with
    (``adopt_record``: e.g. ``target_keep: last``, one LP per trial seed, no aux LP).
    """
    path = SweepLayout(root).record
    if io_storage.exists(path):
        stored = parse_record(io_storage.read_bytes(path), str(path))
        if stored.get("version", 1) < RECORD_VERSION:
            config, adopted = adopt_record(config, stored.get("config", {}))
            if adopted:
                print(
                    f"raysoup: {root} was recorded by an earlier raysoup: resuming it as it "
                    f"began, with {adopted} (a new --name runs today's defaults)",
                    file=sys.stderr,
                )
        if stored.get("fingerprint") != config.fingerprint():
            old, new = {**ADDED_LATER, **stored.get("config", {})}, config.to_dict()
            changed = sorted(
                k for k in set(old) | set(new) if k not in RUN_KNOBS and old.get(k) != new.get(k)
            )
            raise OptionsError(
                f"{root} already holds sweep {config.name!r} with a different config "
                f"(changed: {changed}); use another --name, or the original config to resume"
            )
        return config
    record = {
        "version": RECORD_VERSION,
        "fingerprint": config.fingerprint(),
        "config": config.to_dict(),
    }
    io_storage.write_bytes_atomic(path, json.dumps(record, indent=2).encode())
    return config
