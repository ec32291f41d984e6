"""Uniform averaging of state dicts, kept as a running mean that ingredients join one by one.

Policy (the reference averages parameters and keeps the first model's buffers; raysoup
decides explicitly):

- Floating tensors — parameters *and* BatchNorm ``running_mean``/``running_var`` — are
  averaged. Averaging the running statistics is what model soups does (it averages the
  whole state dict); DiWA/Ratatouille keep the first model's buffers instead.
- Integer/bool tensors (BatchNorm's ``num_batches_tracked``) cannot be averaged: the soup
  takes their elementwise maximum over the ingredients (a running maximum).

Arithmetic. The soup holds the running *mean* of its ``n`` ingredients — the running sum
scaled by ``1/n`` — and adds the ``n+1``-th with one ``lerp``:
``mean <- mean + (x - mean) / (n+1)`` (``torch._foreach_lerp_``, as
``torch.optim.swa_utils`` updates its averaged model). The first ingredient is copied
exactly. This makes both hot paths a single pass over the bytes, within a small factor of
a plain copy (``experiments/bench/merge_throughput.py``):

- ``add`` updates the mean in place (no temporaries, no dtype conversion when the state
  already has the mean's dtype);
- ``average_with`` — the weights of a greedy try, soup + candidate — is the same ``lerp``
  written elsewhere: with ``reuse=True`` into buffers the soup keeps between tries. A
  sum would need a second pass (``(sum + x) / (n+1)``) and, for fp64, twice the bytes.

Accumulation dtype: **float32** by default (promoted if a tensor is wider, e.g. float64
stays float64; float16/bfloat16 states are averaged in float32). Bit-identical soups do
not need a wider type: the result of a sequence of elementwise IEEE operations depends
only on their order, and the callers (``raysoup.soup.group``) always add ingredients in
rank order, whatever order they arrived in. So a given ingredient set gives the same bits
on a given device and build; ``average_with(x)`` gives exactly the bits of ``add(x)``
then ``average()``; and ``uniform_average`` of the same states in the same order gives the
same bits as well. float64 would only shave rounding error far below the spread between
fine-tuned ingredients (fp32 mean of ``n`` models: relative error about ``n * 6e-8`` at
worst) while moving 2.5x the bytes of a copy on every merge. Pass
``accum_dtype=torch.float64`` to get it anyway.

Device: the means live on ``device`` (default: each tensor's own device); states may
live anywhere (checkpoints are loaded on the CPU) and each tensor moves once per merge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
BUFFER_NUMEL = 1 << 14  # greedy tries write tensors larger than this into kept buffers


@dataclass
class _Group:
    """The means of one dtype and device, large tensors and small ones apart.

    A greedy try on the CPU writes each large tensor into a buffer kept between tries
    (``torch.lerp(..., out=)``: a fresh 100 MB would cost page faults on every try) and
    the small ones with one ``torch._foreach_lerp`` (a loop in C++, no Python per tensor).
    """

    keys: list[str]
    means: list[Tensor]
    small_keys: list[str]
    small_means: list[Tensor]


@dataclass(frozen=True)
class _Spec:
    """What the first state said about one tensor; later states must agree."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    floating: bool


def _is_averaged(t: Tensor) -> bool:
    return t.is_floating_point()


def _foreach_lerp(means: list[Tensor], values: list[Tensor], weight: float) -> list[Tensor]:
    return list(torch._foreach_lerp(means, values, weight)) if means else []


def _maximum(stacked: Tensor) -> Tensor:
    """The elementwise maximum over the first dimension (``any`` for bool)."""
    return stacked.any(dim=0) if stacked.dtype == torch.bool else stacked.amax(dim=0)


class RunningSoup:
    """A running mean and count over state dicts; ``average()`` is their uniform soup."""

    def __init__(
        self, accum_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        if not accum_dtype.is_floating_point:
            raise ValueError(f"accum_dtype must be floating point, got {accum_dtype}")
        self.accum_dtype = accum_dtype
        self.device = torch.device(device) if device is not None else None
        self.clear()

    def clear(self) -> None:
        """Forget every ingredient (the next ``add`` defines the keys and shapes again)."""
        self._specs: dict[str, _Spec] = {}
        self._means: dict[str, Tensor] = {}
        self._narrower: list[str] = []  # keys whose state dtype is narrower than the mean's
        self._groups: list[_Group] = []
        # average_with(reuse=True) writes each group's large tensors here
        self._buffers: list[list[Tensor]] | None = None
        self._int_max: dict[str, Tensor] = {}  # running maxima of the integer buffers (CPU)
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def __len__(self) -> int:
        return self._count

    # ------------------------------------------------------------ updates

    def add(self, state: Mapping[str, Tensor]) -> None:
        """Add one ingredient: one in-place ``lerp`` per (dtype, device) group."""
        if self._count == 0:
            self._start(state)  # the means start as exact copies of this state
        else:
            self._check(state)
            self._lerp_(state, 1.0 / (self._count + 1))
            for key, current in self._int_max.items():
                new = self._as_int(key, state[key])
                self._int_max[key] = _maximum(torch.stack([current, new]))
        self._count += 1

    def average(self) -> dict[str, Tensor]:
        """The uniform soup (new tensors), each in its original dtype and key order."""
        if self._count == 0:
            raise ValueError("cannot average an empty soup")
        return self._assemble(
            {k: m.to(self._specs[k].dtype, copy=True) for k, m in self._means.items()}, None
        )

    def average_with(
        self, state: Mapping[str, Tensor], *, reuse: bool = False
    ) -> dict[str, Tensor]:
        """The uniform soup of the ingredients *plus* ``state``, leaving this soup as it is.

        This is how a candidate is tried; the result has exactly the bits that ``add(state)``
        then ``average()`` would give. With ``reuse=True`` the floating tensors are written
        into buffers this soup keeps and overwrites on the next ``reuse=True`` call (no
        allocation per try): use the result before trying again, or copy it.
        """
        if self._count == 0:
            trial = RunningSoup(self.accum_dtype, self.device)
            trial.add(state)
            return trial.average()
        self._check(state)
        weight = 1.0 / (self._count + 1)
        if reuse and self._buffers is None:
            self._buffers = [[torch.empty_like(m) for m in g.means] for g in self._groups]
        floating: dict[str, Tensor] = {}
        for i, group in enumerate(self._groups):
            values = self._values(state, group.keys, group.means)
            if reuse and group.means and group.means[0].device.type == "cpu":
                # torch._foreach_lerp on the CPU is this same loop of lerp kernels
                results = self._buffers[i]  # type: ignore[index]
                for mean, value, out in zip(group.means, values, results, strict=True):
                    torch.lerp(mean, value, weight, out=out)
            else:  # an accelerator's caching allocator makes fresh outputs cheap
                results = _foreach_lerp(group.means, values, weight)
            floating.update(zip(group.keys, results, strict=True))
            small = self._values(state, group.small_keys, group.small_means)
            small = _foreach_lerp(group.small_means, small, weight)
            floating.update(zip(group.small_keys, small, strict=True))
        for key in self._narrower:
            floating[key] = floating[key].to(self._specs[key].dtype)
        return self._assemble(floating, state)

    # ------------------------------------------------------------ internals

    def _target_device(self, t: Tensor) -> torch.device:
        return self.device if self.device is not None else t.device

    def _start(self, state: Mapping[str, Tensor]) -> None:
        groups: dict[tuple[torch.dtype, torch.device], list[tuple[str, Tensor]]] = {}
        for key, t in state.items():
            if not isinstance(t, Tensor):
                raise ValueError(f"tensor {key!r}: expected a torch.Tensor, got {type(t)}")
            if t.is_complex():
                raise ValueError(f"tensor {key!r}: complex dtype {t.dtype} is not supported")
            floating = _is_averaged(t)
            self._specs[key] = _Spec(t.shape, t.dtype, t.device, floating)
            if floating:
                dtype = torch.promote_types(self.accum_dtype, t.dtype)
                groups.setdefault((dtype, self._target_device(t)), []).append((key, t))
            else:
                self._int_max[key] = self._as_int(key, t)
        for (dtype, device), members in groups.items():
            group = _Group([], [], [], [])
            for key, t in members:
                mean = t.detach().to(device, dtype, copy=True)  # an exact copy to start
                self._means[key] = mean
                if t.dtype != dtype:
                    self._narrower.append(key)
                keys, means = (
                    (group.keys, group.means)
                    if t.numel() > BUFFER_NUMEL
                    else (group.small_keys, group.small_means)
                )
                keys.append(key)
                means.append(mean)
            self._groups.append(group)
        self._means = {k: self._means[k] for k in self._specs if k in self._means}

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
            if t.is_floating_point() != spec.floating:
                raise ValueError(f"tensor {key!r}: dtype {t.dtype} != soup's {spec.dtype}")

    @staticmethod
    def _values(state: Mapping[str, Tensor], keys: list[str], means: list[Tensor]) -> list[Tensor]:
        """The state's tensors on the means' device and dtype (no copy when they agree)."""
        if not means:
            return []
        dtype, device = means[0].dtype, means[0].device
        values = [state[k] for k in keys]
        return [
            v.detach().to(device=device, dtype=dtype)
            if v.requires_grad or v.dtype != dtype or v.device != device
            else v
            for v in values
        ]

    def _lerp_(self, state: Mapping[str, Tensor], weight: float) -> None:
        """``mean += weight * (state - mean)``, foreach calls per (dtype, device) group."""
        for group in self._groups:
            for keys, means in ((group.keys, group.means), (group.small_keys, group.small_means)):
                if keys:
                    torch._foreach_lerp_(means, self._values(state, keys, means), weight)

    def _assemble(
        self, floating: Mapping[str, Tensor], extra: Mapping[str, Tensor] | None
    ) -> dict[str, Tensor]:
        """The soup in key order: ``floating`` plus the integer maxima (with ``extra``'s)."""
        ints: dict[str, Tensor] = {}
        if self._int_max:
            keys, maxima = list(self._int_max), list(self._int_max.values())
            if extra is None:
                maxima = [m.clone() for m in maxima]  # never the cached maximum itself
            else:  # one foreach call (max of bools is their or)
                news = [extra[k].detach().to("cpu", self._specs[k].dtype) for k in keys]
                maxima = list(torch._foreach_maximum(maxima, news))
            for key, maximum in zip(keys, maxima, strict=True):
                device = self.device if self.device is not None else self._specs[key].device
                ints[key] = maximum.to(device)
        return {
            key: floating[key] if spec.floating else ints[key] for key, spec in self._specs.items()
        }

    def _as_int(self, key: str, t: Tensor) -> Tensor:
        """A CPU copy in the first state's dtype."""
        return t.detach().to("cpu", self._specs[key].dtype, copy=True).contiguous()


def uniform_average(states: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The uniform soup of ``states``, holding one running mean rather than every model."""
    soup = RunningSoup()
    for state in states:
        soup.add(state)
    if soup.count == 0:
        raise ValueError("uniform_average needs at least one state")
    return soup.average()
