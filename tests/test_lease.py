"""One driver per sweep: the lease is refused while live, taken over once dead or expired,
renewed while held, and given up (stopping the driver) when someone else took it."""

from __future__ import annotations

import _thread
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raysoup.io import storage
from raysoup.io.layout import LEASE as LEASE_FILE
from raysoup.sweep.lease import (
    Lease,
    LeaseHeldError,
    LeaseLostError,
    SweepLease,
    is_live,
    process_started,
)


def _lease(**changes: object) -> Lease:
    now = time.time()
    base = Lease(
        token="t" * 32,
        host="elsewhere",
        pid=1,
        pid_started=0.0,
        command="raysoup run other.yaml",
        started=now - 100,
        heartbeat=now,
        ttl_s=60.0,
    )
    return dataclasses.replace(base, **changes)


def test_liveness_rules() -> None:
    now = time.time()
    host = socket.gethostname()
    assert is_live(_lease(), now, host)  # another host, fresh heartbeat
    assert not is_live(_lease(heartbeat=now - 61), now, host)  # expired
    me = os.getpid()
    mine = _lease(host=host, pid=me, pid_started=process_started(me) or 0.0)
    assert is_live(mine, now, host)
    # same host, a pid that was recycled by another process: not the holder
    assert not is_live(dataclasses.replace(mine, pid_started=mine.pid_started - 50), now, host)


def test_second_driver_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    with SweepLease(tmp_path, command="raysoup run first.yaml"):
        assert json.loads((tmp_path / LEASE_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(LeaseHeldError) as refused:
            SweepLease(tmp_path, command="raysoup run second.yaml").acquire()
        message = str(refused.value)
        assert "raysoup run first.yaml" in message and f"pid {os.getpid()}" in message
        assert socket.gethostname() in message and "expires in" in message
    assert not (tmp_path / LEASE_FILE).exists()  # released on exit
    SweepLease(tmp_path).acquire()  # free again


def test_lease_of_a_killed_driver_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from raysoup.sweep.lease import SweepLease\n"
            "with SweepLease(sys.argv[1], command='doomed driver', ttl_s=3600):\n"
            "    print('held', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeldError, match="doomed driver"):
        SweepLease(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LEASE_FILE).exists()  # SIGKILL leaves the file behind...
    taken = SweepLease(tmp_path, ttl_s=3600).acquire()  # ...but its pid is gone: no wait
    assert taken.pid == os.getpid()


def test_lease_from_another_host_is_taken_over_only_after_expiry(tmp_path: Path) -> None:
    path = tmp_path / LEASE_FILE
    path.write_bytes(_lease().to_bytes())
    with pytest.raises(LeaseHeldError, match="pid 1 on elsewhere"):
        SweepLease(tmp_path).acquire()
    path.write_bytes(_lease(heartbeat=time.time() - 61).to_bytes())
    assert SweepLease(tmp_path).acquire().host == socket.gethostname()


def test_an_unreadable_lease_file_protects_nothing(tmp_path: Path) -> None:
    (tmp_path / LEASE_FILE).write_bytes(b'{"token": "half a wr')
    assert SweepLease(tmp_path).acquire().pid == os.getpid()


def test_heartbeat_renews_the_lease(tmp_path: Path) -> None:
    with SweepLease(tmp_path, ttl_s=0.4) as held:
        first = held.lease
        assert first is not None
        time.sleep(1.0)
        now = json.loads((tmp_path / LEASE_FILE).read_text())
        assert now["token"] == first.token and now["heartbeat"] > first.heartbeat
        # a heartbeat younger than its ttl although the block outlived it
        with pytest.raises(LeaseHeldError):
            SweepLease(tmp_path).acquire()


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """Python's own SIGINT handler for the test: Ray Tune's ``fit`` installs its own and
    leaves it behind, so a test after an in-process sweep would see Tune's graceful stop
    (which the lease's ``interrupt_main`` triggers in a real driver) instead."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("default_sigint")
def test_a_lost_lease_stops_the_driver(tmp_path: Path) -> None:
    stranger = _lease(heartbeat=time.time() + 3600)
    caught = []
    with pytest.raises(LeaseLostError, match=r"taken over by 'raysoup run other\.yaml'"):
        with SweepLease(tmp_path, ttl_s=0.4):
            (tmp_path / LEASE_FILE).write_bytes(stranger.to_bytes())
            try:
                time.sleep(5)  # the heartbeat interrupts this (as it would interrupt Tune)
            except KeyboardInterrupt:
                caught.append(True)
                raise
    assert caught
    # the new holder's lease is left alone
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == stranger.token


@pytest.mark.usefixtures("default_sigint")
def test_interrupt_main_reaches_the_main_thread() -> None:
    """The mechanism the lost-lease stop relies on (guards against a Python change)."""
    threading.Timer(0.1, _thread.interrupt_main).start()
    with pytest.raises(KeyboardInterrupt):
        time.sleep(5)


@pytest.mark.usefixtures("s3_endpoint")
def test_lease_on_s3(s3_bucket: str) -> None:
    root = storage.join(s3_bucket, "runs", "sweep")
    with SweepLease(root, command="first", settle_s=0.2):
        assert storage.exists(storage.join(root, LEASE_FILE))
        with pytest.raises(LeaseHeldError, match="'first'"):
            SweepLease(root, settle_s=0.2).acquire()
    assert not storage.exists(storage.join(root, LEASE_FILE))
    expired = _lease(heartbeat=time.time() - 100)
    storage.write_bytes_atomic(storage.join(root, LEASE_FILE), expired.to_bytes())
    assert SweepLease(root, settle_s=0.2).acquire().pid == os.getpid()


@pytest.mark.usefixtures("s3_endpoint")
def test_two_drivers_racing_on_s3_one_wins(s3_bucket: str) -> None:
    """Both find no lease and write theirs; after the settle time only one sees its own."""
    root = storage.join(s3_bucket, "race")
    outcomes: list[str] = []

    def contend() -> None:
        try:
            SweepLease(root, settle_s=0.5).acquire()
            outcomes.append("won")
        except LeaseHeldError:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "won"]
