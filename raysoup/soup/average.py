"""Uniform averaging of state dicts, kept as a running sum so ingredients can come and go.

Policy (the reference averages parameters and keeps the first model's buffers; raysoup
decides explicitly):

- Floating tensors — parameters *and* BatchNorm ``running_mean``/``running_var`` — are
  averaged. Averaging the running statistics is what model soups does (it averages the
  whole state dict); DiWA/Ratatouille keep the first model's buffers instead.
- Integer/bool tensors (BatchNorm's ``num_batches_tracked``) cannot be averaged: the soup
  takes their elementwise maximum over the ingredients. A maximum cannot be undone by a
  subtraction, so every distinct value is kept with a multiplicity; these buffers are tiny
  and the number of distinct values is bounded by the number of ingredients.

Sums live in ``accum_dtype`` (float64 by default, promoted if a tensor is wider) on
``device`` (default: each tensor's own device), and are updated with ``torch._foreach_*``
ops over tensors grouped by dtype and device, as ``torch.optim.swa_utils`` does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class _Spec:
    """What the first state said about one tensor; later states must agree."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    floating: bool


def _is_averaged(t: Tensor) -> bool:
    return t.is_floating_point()


class RunningSoup:
    """A running sum and count over state dicts; ``average()`` is their uniform soup."""

    def __init__(
        self, accum_dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> None:
        if not accum_dtype.is_floating_point:
            raise ValueError(f"accum_dtype must be floating point, got {accum_dtype}")
        self.accum_dtype = accum_dtype
        self.device = torch.device(device) if device is not None else None
        self.clear()

    def clear(self) -> None:
        """Forget every ingredient (the next ``add`` defines the keys and shapes again)."""
        self._specs: dict[str, _Spec] = {}
        self._sums: dict[str, Tensor] = {}
        self._ints: dict[str, Counter[bytes]] = {}
        self._int_values: dict[str, dict[bytes, Tensor]] = {}
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def __len__(self) -> int:
        return self._count

    # ------------------------------------------------------------ updates

    def add(self, state: Mapping[str, Tensor]) -> None:
        """Add one ingredient."""
        if self._count == 0:
            self._start(state)
        else:
            self._check(state)
        self._accumulate(state, alpha=1.0)
        for key in self._ints:
            t = self._as_int(key, state[key])
            value = t.numpy().tobytes()
            self._ints[key][value] += 1
            self._int_values[key].setdefault(value, t)
        self._count += 1

    def subtract(self, state: Mapping[str, Tensor]) -> None:
        """Remove one ingredient previously added (integer buffers must match one exactly)."""
        if self._count == 0:
            raise ValueError("cannot subtract from an empty soup")
        self._check(state)
        values = {key: self._as_int(key, state[key]).numpy().tobytes() for key in self._ints}
        for key, value in values.items():
            if self._ints[key][value] == 0:
                raise ValueError(f"tensor {key!r}: this value was never added to the soup")
        if self._count == 1:
            self.clear()
            return
        self._accumulate(state, alpha=-1.0)
        for key, value in values.items():
            self._ints[key][value] -= 1
            if self._ints[key][value] == 0:
                del self._ints[key][value]
                del self._int_values[key][value]
        self._count -= 1

    def average(self) -> dict[str, Tensor]:
        """The uniform soup, each tensor in its original dtype and key order."""
        if self._count == 0:
            raise ValueError("cannot average an empty soup")
        keys = list(self._sums)
        means = torch._foreach_div([self._sums[k] for k in keys], float(self._count))
        averaged = dict(zip(keys, means, strict=True))
        out: dict[str, Tensor] = {}
        for key, spec in self._specs.items():
            if spec.floating:
                out[key] = averaged[key].to(spec.dtype)
            else:
                stacked = torch.stack(list(self._int_values[key].values()))
                maximum = stacked.any(dim=0) if spec.dtype == torch.bool else stacked.amax(dim=0)
                out[key] = maximum.to(self.device if self.device is not None else spec.device)
        return out

    def average_with(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The uniform soup of the ingredients *plus* ``state``, leaving this soup as it is.

        This is how a candidate is tried: a subtraction afterwards would not restore the
        sums bit for bit (floating-point addition does not undo exactly).
        """
        if self._count == 0:
            trial = RunningSoup(self.accum_dtype, self.device)
            trial.add(state)
            return trial.average()
        self._check(state)
        keys = list(self._sums)
        values = [
            state[k].detach().to(device=self._sums[k].device, dtype=self._sums[k].dtype)
            for k in keys
        ]
        totals = torch._foreach_add([self._sums[k] for k in keys], values)
        torch._foreach_div_(totals, float(self._count + 1))
        averaged = dict(zip(keys, totals, strict=True))
        out: dict[str, Tensor] = {}
        for key, spec in self._specs.items():
            if spec.floating:
                out[key] = averaged[key].to(spec.dtype)
            else:
                stacked = torch.stack(
                    [*self._int_values[key].values(), self._as_int(key, state[key])]
                )
                maximum = stacked.any(dim=0) if spec.dtype == torch.bool else stacked.amax(dim=0)
                out[key] = maximum.to(self.device if self.device is not None else spec.device)
        return out

    # ------------------------------------------------------------ internals

    def _target_device(self, t: Tensor) -> torch.device:
        return self.device if self.device is not None else t.device

    def _start(self, state: Mapping[str, Tensor]) -> None:
        for key, t in state.items():
            if not isinstance(t, Tensor):
                raise ValueError(f"tensor {key!r}: expected a torch.Tensor, got {type(t)}")
            if t.is_complex():
                raise ValueError(f"tensor {key!r}: complex dtype {t.dtype} is not supported")
            floating = _is_averaged(t)
            self._specs[key] = _Spec(t.shape, t.dtype, t.device, floating)
            if floating:
                dtype = torch.promote_types(self.accum_dtype, t.dtype)
                self._sums[key] = torch.zeros(t.shape, dtype=dtype, device=self._target_device(t))
            else:
                self._ints[key] = Counter()
                self._int_values[key] = {}

    def _check(self, state: Mapping[str, Tensor]) -> None:
        missing = [k for k in self._specs if k not in state]
        extra = [k for k in state if k not in self._specs]
        if missing or extra:
            raise ValueError(
                f"state keys differ from the soup's: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for key, spec in self._specs.items():
            t = state[key]
            if not isinstance(t, Tensor):
                raise ValueError(f"tensor {key!r}: expected a torch.Tensor, got {type(t)}")
            if t.shape != spec.shape:
                raise ValueError(
                    f"tensor {key!r}: shape {tuple(t.shape)} != soup's {tuple(spec.shape)}"
                )
            if _is_averaged(t) != spec.floating:
                raise ValueError(f"tensor {key!r}: dtype {t.dtype} != soup's {spec.dtype}")

    def _accumulate(self, state: Mapping[str, Tensor], alpha: float) -> None:
        """``sums += alpha * state`` with one foreach call per (dtype, device) group."""
        groups: dict[tuple[torch.dtype, torch.device], tuple[list[Tensor], list[Tensor]]] = {}
        for key, total in self._sums.items():
            sums, values = groups.setdefault((total.dtype, total.device), ([], []))
            sums.append(total)
            values.append(state[key].detach().to(device=total.device, dtype=total.dtype))
        for sums, values in groups.values():
            torch._foreach_add_(sums, values, alpha=alpha)

    def _as_int(self, key: str, t: Tensor) -> Tensor:
        """A CPU copy in the first state's dtype, so equal values give equal bytes."""
        return t.detach().to("cpu", self._specs[key].dtype, copy=True).contiguous()


def uniform_average(states: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The uniform soup of ``states``, holding one running sum rather than every model."""
    soup = RunningSoup()
    for state in states:
        soup.add(state)
    if soup.count == 0:
        raise ValueError("uniform_average needs at least one state")
    return soup.average()
