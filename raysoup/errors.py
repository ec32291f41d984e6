"""What went wrong, by meaning: each expected condition is a ``RaysoupError`` whose
class says which exit code the ``raysoup`` command gives and how its message starts.

| code | class | meaning |
|---|---|---|
| 0 | | done |
| 1 | ``SweepError`` | a stage could not finish (Ray, Tune or the soup actor failed) |
| 2 | ``BadInputError`` | a bad config, argument, data layout or checkpoint: fix the input |
| 3 | ``RunsFailedError`` | the sweep ended, but some runs failed: run it again to retry them |
| 4 | ``HeldError`` | another live driver holds the sweep |
| 5 | ``EnvironmentProblemError`` | weights missing offline, storage unreachable, no CUDA |

The classes also keep the built-in base their callers catch (``ValueError`` for bad
input, ``RuntimeError`` for the rest), so ``except ValueError`` still works.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_SWEEP = 1
EXIT_BAD_INPUT = 2
EXIT_RUNS_FAILED = 3
EXIT_HELD = 4
EXIT_ENVIRONMENT = 5


class RaysoupError(Exception):
    """An expected condition: the command prints ``raysoup CMD: LABEL: message`` (one
    line, no traceback) and exits with ``exit_code``."""

    exit_code: ClassVar[int] = EXIT_SWEEP
    label: ClassVar[str] = "error"


class SweepError(RaysoupError, RuntimeError):
    """A stage of the sweep could not finish."""


class BadInputError(RaysoupError, ValueError):
    """Bad input: a config, an argument, a data layout or a checkpoint that is refused."""

    exit_code = EXIT_BAD_INPUT


class RunsFailedError(RaysoupError, RuntimeError):
    """Some runs failed (after their retries); the same command again retries them."""

    exit_code = EXIT_RUNS_FAILED
    label = "failed"


class HeldError(RaysoupError, RuntimeError):
    """Another live driver holds (or took over) the sweep."""

    exit_code = EXIT_HELD
    label = "refused"


class EnvironmentProblemError(RaysoupError, RuntimeError):
    """The input is fine but this machine cannot do it: weights missing offline, storage
    unreachable, CUDA asked for and absent. The message says what to do."""

    exit_code = EXIT_ENVIRONMENT
    label = "environment"
