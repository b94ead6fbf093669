"""dce: nodes (and their parameters) that no output needs are removed."""

from hypothesis import strategies as st

from equivalence import ir_after
from passcase import property_test
from specgen import specs_with

BEFORE = """specc: 1
name: dce
inputs:
  x: f32[B, 4]
graph: |
  unused = linear(x, 8)
  y = relu(x)
outputs:
  y:
"""

EXPECTED = """graph dce
  dims B=2
  %0: f32[B, 4] = input(name="x")
  %2: f32[B, 4] = relu(%0)
  return y=%2
"""


def test_before_expected():
    assert ir_after(BEFORE, "dce") == EXPECTED


def test_dead_parameters_leave_the_build():
    import specc

    assert specc.check(BEFORE).params == 40
    model = specc.load(BEFORE, opt_level=1)
    assert sum(p.numel() for p in model.parameters()) == 0


@st.composite
def with_dead_code(draw):
    text = draw(specs_with(["tanh({v})"]))
    return text.replace("graph: |\n", "graph: |\n  dead = mlp(x, hidden=8)\n")


test_property = property_test("dce", [], spec_strategy=with_dead_code())
