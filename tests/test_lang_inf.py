"""The `inf` literal: `-inf` fills masked attention scores (where(mask, s, -inf), masked_fill(s, m, -inf)),
so that softmax gives exactly zero weight to them; generated code spells it float("-inf"). Misuse is a
located error: inf is a float, never a size, and arithmetic on params that overflows to it is refused.

Tolerance: softmax rows in float64 against torch's own softmax of the same masked scores: <= 1e-12;
masked weights are compared exactly (0).
"""

from __future__ import annotations

import functools

import torch

import specc
from opcheck import assert_error, inputs64, load64, spec_text


spec = functools.partial(spec_text, dims="B: 2, T: 5")

MASKED = spec("s: 'f32[B, T, T]'", "keep = tril(ones(T, T, dtype=bool))\n"
                                    "a = softmax(where(keep, s, -inf))\nb = softmax(masked_fill(s, not keep, -inf))",
              outputs="a b")


def test_minus_inf_masks_give_zero_weight():
    model = load64(MASKED)
    (s,) = inputs64(model)
    with torch.no_grad():
        a, b = model(s)
    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    want = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    for got in (a, b):
        assert torch.equal(got.masked_select(~keep.expand_as(got)), torch.zeros(2 * 10, dtype=torch.float64))
        assert (got - want).abs().max().item() <= 1e-12


def test_inf_reads_as_float_inf_in_generated_code(tmp_path):
    src = (specc.build(MASKED, tmp_path / "o") / "model.py").read_text()
    assert 'torch.where(keep, s, float("-inf"))' in src
    assert 's.masked_fill(~keep, float("-inf"))' in src
    ir = specc.compile(MASKED)
    assert any(n.op == "scalar" and n.attr("value") == float("-inf") for _, n in ir.nodes())


def test_inf_misuse_is_a_located_error():
    assert_error(spec("x: 'f32[B, T]'", "y = linear(x, inf)"), 6, 17,
                 "linear(): argument 'out' must be an integer, got the number inf")
    assert_error(spec("x: 'f32[B, T]'", "y = x * (2 * inf)"), 6, 12, "result out of range")
    assert_error(spec("n: 'i64[B, T]', m: 'bool[B, T]'", "y = masked_fill(n, m, -inf)"), 6, 25,
                 "masked_fill: x i64[B, T] is an integer tensor, which cannot hold -inf")
    assert_error(spec("x: 'f32[B, T]'", "y = x + infinity"), 6, 11, "undefined name 'infinity'")
    # number arguments must be finite (they reach generated code as literals), masked_fill's value aside
    assert_error(spec("x: 'f32[B, T]'", "y = layer_norm(x, eps=inf)"), 6, 21,
                 "layer_norm(): argument 'eps' must be a finite number, got inf")
    assert_error(spec("x: 'f32[B, T, 4]'", "y = rotary(x, base=-inf)"), 6, 17,
                 "rotary(): argument 'base' must be a finite number, got -inf")
    assert_error(spec("x: 'f32[B, T]'", "y = x * int(inf)"), 6, 11, "int(): cannot convert the number inf to an integer")
    assert_error(spec("x: 'f32[B, T]'", "y = x[:, :inf]"), 6, 13, "slice bounds must be integers, got the number inf")
    assert_error(spec("x: 'f32[B, T]'", "y = reshape(x, inf)"), 6, 18,
                 "reshape(): argument 'shape' must be sizes (integers or dimensions), got the number inf")


def test_a_value_named_inf_is_that_value():
    model = load64(spec("x: 'f32[B, T]'", "inf = x * 2.0\ny = inf + 1.0"))
    (x,) = inputs64(model)
    with torch.no_grad():
        assert torch.equal(model(x), x * 2.0 + 1.0)
