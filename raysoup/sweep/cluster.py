"""Attach to a running Ray cluster, or start a local instance: one rule for every script.

- ``--address ADDR`` given (``auto``, ``ray://...``, ``HOST:PORT``): attach to it. ``ray
  submit cluster.yaml script.py -- --address auto`` runs the script on the head node,
  where ``auto`` finds the cluster.
- else ``$RAY_ADDRESS``: ``ray job submit`` sets it for the job's driver, so a submitted
  script attaches to the cluster it was submitted to without any flag.
- else ``local``: a new Ray instance on this machine, stopped when the script exits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import ray

LOCAL = "local"


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The address ``ray.init`` gets: ``address``, else ``$RAY_ADDRESS``, else ``local``."""
    environ = os.environ if environ is None else environ
    return address or environ.get("RAY_ADDRESS") or LOCAL


def connect(address: str | None = None, **local: Any) -> str:
    """``ray.init`` per :func:`resolve_address` (no-op when Ray is up); returns the address.
    ``local``: more ``ray.init`` arguments for a new local instance (``num_cpus``,
    ``_temp_dir``...); an existing cluster keeps its own resources."""
    resolved = resolve_address(address)
    if not ray.is_initialized():
        if resolved == LOCAL:
            ray.init(address=LOCAL, **{"include_dashboard": False, **local})
        else:
            ray.init(address=resolved)
    return resolved


@contextmanager
def ray_session(address: str | None = None) -> Iterator[str]:
    """Ray for the block, per :func:`connect`. A Ray this started is shut down when the
    block ends (at once: left to the interpreter's exit, it takes seconds longer); one
    already up is left as it is."""
    started = not ray.is_initialized()
    resolved = connect(address)
    try:
        yield resolved
    finally:
        if started:
            ray.shutdown()
