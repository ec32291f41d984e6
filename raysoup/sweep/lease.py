"""One driver per sweep: an exclusive, expiring lease on ``<storage>/<name>/lease.json``.

Every command that writes into a sweep folder (``raysoup run``, ``raysoup soup``, the
experiment scripts through ``run_sweep``) holds the lease while it works; read-only
commands (``raysoup results``) never look at it.

The lease is a small JSON record (holder token, host, pid, command, start, heartbeat,
ttl). The holder renews ``heartbeat`` every ``ttl / 4`` seconds from a daemon thread and
deletes the file when it finishes. A lease is *live* while its heartbeat is younger than
its ttl, except that a holder on this very host whose process is gone (a driver killed
with SIGKILL) is dead at once. A second driver finding a live lease is refused with the
holder named; a dead or expired lease is taken over without any manual step.

Taking the lease is a compare-and-swap, which no pyarrow filesystem offers:

- **local paths**: the read-decide-write runs under ``fcntl.flock`` on ``.lease.lock``
  (released by the kernel when its process dies), so two drivers on one machine, or on
  hosts sharing a filesystem with working locks, cannot both win;
- **URIs** (S3, GCS...): write, wait ``settle_s``, read back. Object stores are
  read-after-write consistent, so of two drivers that both found no live lease, the one
  whose write landed last sees its own token and wins; the other sees a stranger's and
  is refused. Two drivers can only both win if one takes longer than ``settle_s``
  between reading and writing the lease.

A holder that finds someone else's token in the file while renewing (it stalled past
its ttl and was taken over) stops its driver with ``LeaseLostError``: it must not write
next to the new holder.
"""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raysoup.errors import HeldError
from raysoup.io import storage
from raysoup.io.layout import SweepLayout
from raysoup.io.storage import Location

TTL_ENV = "RAYSOUP_LEASE_TTL_S"
DEFAULT_TTL_S = 60.0
DEFAULT_SETTLE_S = 2.0


class LeaseHeldError(HeldError):
    """Another live driver holds the sweep; the message names it and what to do."""


class LeaseLostError(HeldError):
    """This driver's lease was taken over while it ran (it stalled past its ttl)."""


@dataclass(frozen=True)
class Lease:
    """Who holds a sweep folder, and until when."""

    token: str
    host: str
    pid: int
    pid_started: float  # the process's start time: a recycled pid is not the holder
    command: str
    started: float
    heartbeat: float
    ttl_s: float

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Lease | None:
        """The lease in ``data``, or ``None`` for a file that is not one (torn, foreign):
        an unreadable lease protects nothing, so it is treated as absent."""
        try:
            record = json.loads(data)
            return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self, now: float) -> str:
        return (
            f"{self.command!r} (pid {self.pid} on {self.host}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, "
            f"last heartbeat {now - self.heartbeat:.0f} s ago)"
        )


def process_started(pid: int) -> float | None:
    """When process ``pid`` of this host started (seconds since boot on Linux), or ``None``
    if there is no such live process; a recycled pid gets a different value."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no procfs (macOS): alive or not, start unknown
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state is field 3
    if fields[0] in ("Z", "X"):  # killed, not yet reaped
        return None
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime in ticks


def is_live(lease: Lease, now: float, host: str) -> bool:
    """Whether ``lease`` still protects its sweep (pure but for the local process check)."""
    if now - lease.heartbeat > lease.ttl_s:
        return False
    if lease.host == host:  # we can see its process: a killed driver is dead at once
        started = process_started(lease.pid)
        return started is not None and abs(started - lease.pid_started) < 1.0
    return True


def default_ttl() -> float:
    value = os.environ.get(TTL_ENV, "")
    try:
        ttl = float(value) if value else DEFAULT_TTL_S
    except ValueError:
        raise ValueError(f"${TTL_ENV}={value!r}: expected a number of seconds") from None
    if not ttl > 0:
        raise ValueError(f"${TTL_ENV}={value!r}: expected a positive number of seconds")
    return ttl


class SweepLease:
    """``with SweepLease(root):`` holds ``<root>/lease.json`` for the block.

    Raises ``LeaseHeldError`` on entry when another live driver holds it. If the lease is
    lost while the block runs, the main thread gets a ``KeyboardInterrupt`` (so Tune saves
    its state and stops) and the block exits with ``LeaseLostError``.
    """

    def __init__(
        self,
        root: Location,
        command: str | None = None,
        ttl_s: float | None = None,
        settle_s: float = DEFAULT_SETTLE_S,
    ) -> None:
        self.root = root
        self.path = SweepLayout(root).lease
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.ttl_s = default_ttl() if ttl_s is None else ttl_s
        self.settle_s = settle_s
        self.host = socket.gethostname()
        self.lease: Lease | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the record

    def _read(self) -> Lease | None:
        try:
            return Lease.from_bytes(storage.read_bytes(self.path))
        except FileNotFoundError:
            return None

    def _new_lease(self, now: float) -> Lease:
        pid = os.getpid()
        return Lease(
            token=uuid.uuid4().hex,
            host=self.host,
            pid=pid,
            pid_started=process_started(pid) or now,
            command=self.command,
            started=now,
            heartbeat=now,
            ttl_s=self.ttl_s,
        )

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The critical section of a take-over: a file lock locally, nothing on URIs."""
        if storage.is_uri(self.root):
            yield
            return
        import fcntl

        lock = Path(SweepLayout(self.root).lease_lock)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _refusal(self, held: Lease, now: float) -> LeaseHeldError:
        wait = max(0.0, held.ttl_s - (now - held.heartbeat))
        return LeaseHeldError(
            f"{self.root} is held by {held.describe(now)}. Wait for it to finish, or stop "
            f"it (Ctrl-C) and run this command again; if that driver is gone (killed, host "
            f"lost), its lease expires in {wait:.0f} s and the next run takes over."
        )

    # ------------------------------------------------------------ acquire / renew / release

    def check(self) -> None:
        """Raise ``LeaseHeldError`` if a live driver holds the sweep (takes nothing: the
        early, cheap answer for a second driver, before it imports torch and Ray)."""
        held = self._read()
        if held is not None and is_live(held, time.time(), self.host):
            raise self._refusal(held, time.time())

    def acquire(self) -> Lease:
        with self._exclusive():
            now = time.time()
            held = self._read()
            if held is not None and is_live(held, now, self.host):
                raise self._refusal(held, now)
            lease = self._new_lease(now)
            storage.write_bytes_atomic(self.path, lease.to_bytes())
        if storage.is_uri(self.root):  # no lock: the last writer wins (see module doc)
            time.sleep(self.settle_s)
            found = self._read()
            if found is None or found.token != lease.token:
                raise self._refusal(found or lease, time.time())
        if held is not None:
            print(
                f"raysoup: took over the lease of {self.root} from {held.describe(now)}",
                file=sys.stderr,
            )
        self.lease = lease
        return lease

    def renew(self) -> None:
        """Write a fresh heartbeat, or record that the lease was lost."""
        assert self.lease is not None
        with self._exclusive():
            found = self._read()
            if found is None or found.token != self.lease.token:
                who = found.describe(time.time()) if found else "nobody (the file is gone)"
                self.lost = f"the lease of {self.root} was taken over by {who}"
                return
            self.lease = dataclasses.replace(self.lease, heartbeat=time.time())
            storage.write_bytes_atomic(self.path, self.lease.to_bytes())

    def release(self) -> None:
        """Delete the lease file if it is still ours."""
        if self.lease is None:
            return
        with self._exclusive():
            found = self._read()
            if found is not None and found.token == self.lease.token:
                fs, path = storage.filesystem(self.path)
                fs.delete_file(path)
        self.lease = None

    def _heartbeat(self) -> None:
        interval = self.ttl_s / 4
        while not self._stop.wait(interval):
            try:
                self.renew()
            except OSError as error:  # storage hiccup: try again; expiry is ttl away
                print(f"raysoup: lease heartbeat failed ({error}); retrying", file=sys.stderr)
                continue
            if self.lost:
                print(f"raysoup: error: {self.lost}; stopping this driver", file=sys.stderr)
                _thread.interrupt_main()
                return

    def __enter__(self) -> SweepLease:
        self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="raysoup-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            self.lease = None  # not ours any more: leave the new holder's file alone
            raise LeaseLostError(f"{self.lost}; this driver stopped") from (
                error if isinstance(error, BaseException) else None
            )
        self.release()
