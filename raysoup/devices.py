"""Which torch device a name means: one rule for trainer, soup maker and benchmarks."""

from __future__ import annotations

import torch

from raysoup.errors import EnvironmentProblemError
from raysoup.options import OptionsError

AUTO = "auto"


class DeviceUnavailableError(EnvironmentProblemError):
    """A device was asked for that this machine does not have."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto``: CUDA when present, else the CPU. Any other torch device name as given;
    ``cuda`` on a machine without CUDA is an error, not a silent fallback."""
    if str(name) == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise OptionsError(
            f"device={str(name)!r}: {error} (expected 'auto', 'cpu', 'cuda', ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device={str(name)!r} but CUDA is not available here (use device 'auto' or 'cpu')"
        )
    return device
