"""fold_constants: arithmetic on constants computed once; neutral operations dropped."""

from equivalence import ir_after
from passcase import property_test

BEFORE = """specc: 1
name: fold
inputs:
  x: f32[B, 4]
params:
  a: 2
graph: |
  y = x * (a * 0.5) - 0
  z = (3 * x) * 1
  s = x * (sqrt(4.0) / a) ** 2
outputs:
  y:
  z:
  s:
"""

EXPECTED = """graph fold
  params a=2
  dims B=2
  %0: f32[B, 4] = input(name="x")
  %5: f32[] = scalar(value=3, dtype="f32")
  %6: f32[B, 4] = mul(%5, %0)
  return y=%0, z=%6, s=%0
"""


def test_before_expected():
    assert ir_after(BEFORE, "fold_constants") == EXPECTED


def test_a_float_sum_with_zero_stays_unless_the_zero_is_negative():
    # -0.0 + 0 is +0.0, not -0.0: x + 0 and 0 + x are x only for a -0.0 zero (x - 0 for a +0.0 one)
    text = BEFORE.replace("- 0\n", "+ 0\n  w = -0.0 + x\n  v = x - -0.0\n").replace("  y:\n", "  y:\n  w:\n  v:\n")
    ir = ir_after(text, "fold_constants")
    assert "= add(%0, %3)" in ir and "w=%0" in ir and "v=%0" not in ir and "sub(" in ir, ir


def test_no_reassociation():
    # x * 2.0 * 3.0 is (x * 2.0) * 3.0: folding it into x * 6.0 would change the rounding, so it stays
    text = BEFORE.replace("graph: |\n", "graph: |\n  w = x * 2.0 * 3.0\n").replace("  y:\n", "  y:\n  w:\n")
    ir = ir_after(text, "fold_constants")
    assert "value=2.0" in ir and "value=3.0" in ir and "value=6.0" not in ir


test_property = property_test("fold_constants", ["{v} * 1", "{v} + -0.0", "1 * {v}", "{v} / 1", "-0.0 + {v}", "{v} - 0",
                                                 "{v} ** 1"])
