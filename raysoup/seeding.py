"""Stable seeds.

Every random choice in raysoup (splits, hyperparameters, init choices, fusing weights)
is seeded by :func:`seed_hash`, never by Python's salted ``hash()``, so the same config
gives the same numbers on every machine and in every process.
"""

from __future__ import annotations

import hashlib


def seed_hash(*args: object) -> int:
    """A seed in ``[0, 2**31)`` from any printable arguments.

    Identical to DomainBed's ``misc.seed_hash`` (md5 of ``str(args)``), so splits and
    hyperparameters match the reference implementations for the same seeds.
    """
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)
