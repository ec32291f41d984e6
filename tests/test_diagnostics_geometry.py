"""The pure maths of ``raysoup diagnose``: interpolation, angles, the landscape plane."""

from __future__ import annotations

import math

import pytest
import torch

from raysoup.diagnostics import geometry
from raysoup.diagnostics.diagnose import DiagnoseOptions
from raysoup.options import OptionsError
from raysoup.soup.average import uniform_average


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(300, 70, generator=g),  # large enough for the soup's buffer path
        "b": torch.randn(7, generator=g),
        "half": torch.randn(5, generator=g).to(torch.float16),
        "bn.num_batches_tracked": torch.tensor(seed * 10),
    }


def test_interpolation_is_exact_at_the_ends_and_the_two_model_soup_at_one_half() -> None:
    start, end = _state(1), _state(2)
    at0, at1 = geometry.interpolate(start, end, 0.0), geometry.interpolate(start, end, 1.0)
    for key in start:
        assert torch.equal(at0[key], start[key]) and torch.equal(at1[key], end[key])
        assert at0[key].dtype == start[key].dtype
    middle = geometry.interpolate(start, end, 0.5)
    soup = uniform_average([start, end])  # rank order: start first, as the soup adds them
    for key in start:
        assert torch.equal(middle[key], soup[key]), key
    quarter = geometry.interpolate(start, end, 0.25)
    assert torch.allclose(quarter["w"], 0.75 * start["w"] + 0.25 * end["w"], atol=1e-6)
    assert int(quarter["bn.num_batches_tracked"]) == 20  # the soup's max rule
    with pytest.raises(ValueError, match="a=nan"):
        geometry.interpolate(start, end, math.nan)
    with pytest.raises(ValueError, match="only in the first"):
        geometry.interpolate(start, {k: v for k, v in end.items() if k != "b"}, 0.5)


def test_angles_between_deltas() -> None:
    origin = {"x": torch.zeros(2), "n": torch.tensor(3)}
    along_x = {"x": torch.tensor([2.0, 0.0]), "n": torch.tensor(5)}
    along_y = {"x": torch.tensor([0.0, 3.0]), "n": torch.tensor(5)}
    diagonal = {"x": torch.tensor([1.0, 1.0]), "n": torch.tensor(5)}
    dx, dy = geometry.delta(along_x, origin), geometry.delta(along_y, origin)
    assert set(dx) == {"x"} and dx["x"].dtype == torch.float64  # integer buffers left out
    assert geometry.angle_degrees(dx, dy) == pytest.approx(90.0)
    assert geometry.angle_degrees(dx, geometry.delta(diagonal, origin)) == pytest.approx(45.0)
    assert geometry.angle_degrees(dx, dx) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(geometry.angle_degrees(dx, geometry.delta(origin, origin)))


def test_plane_basis_is_orthonormal_and_passes_through_the_three_models() -> None:
    origin, first, second = _state(3), _state(4), _state(5)
    plane = geometry.plane_through(origin, first, second)
    assert geometry.dot(plane.u_hat, plane.u_hat) == pytest.approx(1.0)
    assert geometry.dot(plane.v_hat, plane.v_hat) == pytest.approx(1.0)
    assert geometry.dot(plane.u_hat, plane.v_hat) == pytest.approx(0.0, abs=1e-9)
    assert plane.points[0] == (0.0, 0.0) and plane.points[1] == (1.0, 0.0)
    for (x, y), model in zip(plane.points, (origin, first, second), strict=True):
        rebuilt = plane.at(origin, x, y)
        assert torch.allclose(rebuilt["w"], model["w"], atol=1e-4)
        assert rebuilt["half"].dtype == torch.float16
    xs, ys = geometry.plane_grid(plane, 5)
    assert len(xs) == len(ys) == 5 and xs[0] < 0.0 < 1.0 < xs[-1]
    with pytest.raises(ValueError, match="one line"):
        line = {k: (v * 2 if v.is_floating_point() else v) for k, v in first.items()}
        zero = {k: (v * 0 if v.is_floating_point() else v) for k, v in first.items()}
        geometry.plane_through(zero, first, line)
    with pytest.raises(ValueError, match="grid=1"):
        geometry.plane_grid(plane, 1)


def test_options_are_checked_before_any_work() -> None:
    assert DiagnoseOptions(points=5).coefficients() == [0.0, 0.25, 0.5, 0.75, 1.0]
    for bad, match in (
        (DiagnoseOptions(points=1), "points=1"),
        (DiagnoseOptions(pair_trials=1), "pair_trials=1"),
        (DiagnoseOptions(grid=0), "grid=0"),
        (DiagnoseOptions(device="tpu-please"), "tpu-please"),
    ):
        with pytest.raises(OptionsError, match=match):
            bad.validate()
