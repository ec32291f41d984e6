"""The weight-space geometry of fine-tuned models, tensor by tensor (pure maths, no I/O).

- ``interpolate(start, end, a)``: ``(1 - a) * start + a * end`` as ``torch.lerp`` in
  float32 (wider dtypes stay wide), exact at ``a = 0`` and ``a = 1`` (copies of the
  endpoints). With ``start`` the better-ranked trial, ``a = 0.5`` is bit for bit the
  two-ingredient uniform soup (``soup.average.RunningSoup`` adds its second ingredient
  with this same ``lerp``). Integer buffers (``num_batches_tracked``) follow the soup's
  rule: the elementwise maximum inside the segment, the endpoint's own at its ends.
- ``delta``, ``dot``, ``norm``, ``angle_degrees``: the fine-tuned delta ``theta_i - theta_0``
  and its geometry in float64, over the floating tensors only, one tensor at a time (never
  a flattened copy of a whole model).
- ``Plane``: Garipov et al.'s orthonormal basis of the plane through three models
  ``theta_0, theta_1, theta_2`` (``u = theta_1 - theta_0``, ``v`` = the part of
  ``theta_2 - theta_0`` orthogonal to ``u``), with coordinates in units of ``|u|``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
State = Mapping[str, Tensor]


def _floating(state: State) -> list[str]:
    return [key for key, t in state.items() if t.is_floating_point()]


def _check_keys(a: State, b: State) -> None:
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))[:5]
        extra = sorted(set(b) - set(a))[:5]
        raise ValueError(
            f"models differ in their tensors: only in the first {missing}, "
            f"only in the second {extra}"
        )
    for key, t in a.items():
        if t.shape != b[key].shape:
            raise ValueError(
                f"tensor {key!r}: shapes differ, {tuple(t.shape)} and {tuple(b[key].shape)}"
            )


def _accum(t: Tensor) -> torch.dtype:
    return torch.promote_types(torch.float32, t.dtype)


def interpolate(start: State, end: State, a: float) -> dict[str, Tensor]:
    """The model ``(1 - a) * start + a * end``, each tensor in its own dtype."""
    if not math.isfinite(a):
        raise ValueError(f"interpolation coefficient a={a!r}: expected a finite number")
    _check_keys(start, end)
    out: dict[str, Tensor] = {}
    for key, s in start.items():
        e = end[key]
        if a == 0.0:
            out[key] = s.detach().clone()
        elif a == 1.0:
            out[key] = e.detach().clone()
        elif s.is_floating_point():
            dtype = _accum(s)
            mixed = torch.lerp(s.detach().to(dtype), e.detach().to(s.device, dtype), a)
            out[key] = mixed.to(s.dtype)
        else:
            out[key] = torch.maximum(s, e.to(s.device, s.dtype))
    return out


def delta(model: State, origin: State) -> dict[str, Tensor]:
    """``model - origin`` over the floating tensors, in float64 (CPU tensors)."""
    _check_keys(model, origin)
    return {
        key: model[key].detach().double().cpu() - origin[key].detach().double().cpu()
        for key in _floating(model)
    }


def combine(origin: State, terms: list[tuple[float, Mapping[str, Tensor]]]) -> dict[str, Tensor]:
    """``origin + sum(c * d)`` over the floating tensors (``d`` float64 deltas), each in
    ``origin``'s dtype; integer buffers are ``origin``'s."""
    out: dict[str, Tensor] = {}
    for key, t in origin.items():
        if not t.is_floating_point():
            out[key] = t.detach().clone()
            continue
        value = t.detach().double().cpu().clone()
        for c, d in terms:
            value.add_(d[key], alpha=c)
        out[key] = value.to(t.dtype)
    return out


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """The inner product of two deltas (float64, summed tensor by tensor in key order)."""
    if a.keys() != b.keys():
        raise ValueError("deltas differ in their tensors")
    return math.fsum(
        float(torch.dot(a[k].reshape(-1).double(), b[k].reshape(-1).double())) for k in a
    )


def norm(a: Mapping[str, Tensor]) -> float:
    return math.sqrt(max(dot(a, a), 0.0))


def angle_degrees(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """The angle between two deltas in degrees; ``nan`` when either is zero."""
    na, nb = norm(a), norm(b)
    if na == 0.0 or nb == 0.0:
        return math.nan
    cosine = max(-1.0, min(1.0, dot(a, b) / (na * nb)))
    return math.degrees(math.acos(cosine))


@dataclass(frozen=True)
class Plane:
    """The plane through ``theta_0`` (``origin``), ``theta_1`` and ``theta_2``.

    ``u_hat`` and ``v_hat`` are orthonormal (float64 deltas); ``scale = |theta_1 -
    theta_0|``; ``points`` are the three models' coordinates in units of ``scale``:
    ``(0, 0)``, ``(1, 0)`` and ``(x2, y2)``.
    """

    u_hat: dict[str, Tensor]
    v_hat: dict[str, Tensor]
    scale: float
    points: tuple[tuple[float, float], ...]

    def at(self, origin: State, x: float, y: float) -> dict[str, Tensor]:
        """The model at plane coordinates ``(x, y)`` (units of ``scale``)."""
        return combine(origin, [(x * self.scale, self.u_hat), (y * self.scale, self.v_hat)])


def plane_through(origin: State, first: State, second: State) -> Plane:
    """Garipov's basis of the plane through three models; ``ValueError`` when they are
    on one line (no plane)."""
    u = delta(first, origin)
    w = delta(second, origin)
    scale = norm(u)
    if scale == 0.0:
        raise ValueError("the first two models are equal: they span no plane")
    u_hat = {k: t / scale for k, t in u.items()}
    along = dot(w, u_hat)
    v = {k: w[k] - along * u_hat[k] for k in w}
    height = norm(v)
    if height <= 1e-12 * max(scale, norm(w)):
        raise ValueError("the three models lie on one line: they span no plane")
    v_hat = {k: t / height for k, t in v.items()}
    return Plane(u_hat, v_hat, scale, ((0.0, 0.0), (1.0, 0.0), (along / scale, height / scale)))


def plane_grid(plane: Plane, n: int, margin: float = 0.2) -> tuple[list[float], list[float]]:
    """``n`` x-coordinates and ``n`` y-coordinates covering the plane's three points with
    ``margin`` (a fraction of the span) on every side."""
    if n < 2:
        raise ValueError(f"grid={n}: expected at least 2 points per axis")
    xs = [p[0] for p in plane.points]
    ys = [p[1] for p in plane.points]

    def axis(low: float, high: float) -> list[float]:
        pad = margin * (high - low or 1.0)
        low, high = low - pad, high + pad
        return [low + (high - low) * i / (n - 1) for i in range(n)]

    return axis(min(xs), max(xs)), axis(min(ys), max(ys))
