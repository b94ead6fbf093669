"""cse: identical parameter-free computations done once."""

from equivalence import ir_after
from passcase import property_test

BEFORE = """specc: 1
name: cse
inputs:
  x: f32[B, 4]
graph: |
  a = sigmoid(x) * tanh(x)
  b = sigmoid(x) * tanh(x)
  y = a + b + linear(x, 4) + linear(x, 4)
outputs:
  y:
"""

EXPECTED = """graph cse
  dims B=2
  %0: f32[B, 4] = input(name="x")
  %1: f32[B, 4] = sigmoid(%0)
  %2: f32[B, 4] = tanh(%0)
  %3: f32[B, 4] = mul(%1, %2)
  %7: f32[B, 4] = add(%3, %3)
  %8: f32[B, 4] = linear(%0, out=4, bias=true, tie=none)  @linear {weight: f32[4, 4], bias: f32[4]}
  %9: f32[B, 4] = add(%7, %8)
  %10: f32[B, 4] = linear(%0, out=4, bias=true, tie=none)  @linear_1 {weight: f32[4, 4], bias: f32[4]}
  %11: f32[B, 4] = add(%9, %10)
  return y=%11
"""


def test_before_expected():
    # the two linear layers have their own weights: they are not the same computation
    assert ir_after(BEFORE, "cse") == EXPECTED


test_property = property_test("cse", ["sigmoid({v}) + sigmoid({v})", "tanh({v}) * tanh({v})",
                                      "softmax({v}) - softmax({v}) + {v}"])
