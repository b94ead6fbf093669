"""rot90: quarter turns of images in the graph (SLA's rotated views). Built specs are compared in
float64 with numpy's rot90 (an independent implementation); shape-rule errors at their line:col;
0 FLOPs (a rotation only moves values).

Tolerance: none needed; a rotation moves values without arithmetic, so results are compared exactly.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import specc
from opcheck import assert_error, flops_of, inputs64, load64, spec_text


spec = functools.partial(spec_text, dims="B: 2, H: 3, W: 5")

@pytest.mark.parametrize("k", [-1, 0, 1, 2, 3, 5])
def test_rot90_equals_numpy(k):
    text = spec("x: 'f32[B, 2, H, W]'", f"y = rot90(x, {k})\nz = rot90(x, k={k}, dims=[-1, 1])", "y z")
    model = load64(text)
    (x,) = inputs64(model)
    with torch.no_grad():
        y, z = model(x)
    assert np.array_equal(y.numpy(), np.rot90(x.numpy(), k, axes=(2, 3)))
    assert np.array_equal(z.numpy(), np.rot90(x.numpy(), k, axes=(3, 1)))
    s = specc.check(text)
    odd = k % 2 == 1
    assert str(s.outputs[0].type) == ("f32[B, 2, W, H]" if odd else "f32[B, 2, H, W]")
    assert str(s.outputs[1].type) == ("f32[B, W, H, 2]" if odd else "f32[B, 2, H, W]")


def test_rot90_turns_counter_clockwise_as_displayed():
    text = spec("x: 'f32[2, 2]'", "y = rot90(x, dims=[0, 1])")
    model = load64(text)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    with torch.no_grad():
        assert model(x).tolist() == [[2.0, 4.0], [1.0, 3.0]]


def test_rot90_keeps_integer_value_ranges():
    s = specc.check(spec("n: 'i64[B, H, W] in range(7)'", "y = rot90(n, 1, dims=[1, 2])"))
    assert str(s.outputs[0].type) == "i64[B, W, H] in range(7)"


def test_rot90_errors():
    assert_error(spec("x: 'f32[B, H, W]'", "y = rot90(x, dims=[1, 1])"), 6, 16,
                 "rot90: dims [1, 1] name the same dimension twice")
    assert_error(spec("x: 'f32[B, H, W]'", "y = rot90(x, dims=[1, 3])"), 6, 16,
                 "rot90: dimension 3 is out of range for a rank-3 tensor")
    assert_error(spec("x: 'f32[B, H, W]'", "y = rot90(x, dims=2)"), 6, 16,
                 "rot90: dims must be a list of two dimension indices, got 2")
    assert_error(spec("x: 'f32[B]'", "y = rot90(x, dims=[0, 0])"), 6, 13,
                 "rot90: x f32[B] needs at least two dimensions to turn in")
    assert_error(spec("x: 'f32[B, H, W]'", "y = rot90(x, 1.5, dims=[1, 2])"), 6, 16,
                 "rot90(): argument 'k' must be an integer, got the number 1.5")


def test_rot90_costs_no_flops():
    assert flops_of(spec("x: 'f32[B, 2, H, W]'", "y = rot90(x) + 1.0"), "rot90", B=4) == 0
