"""eliminate_identity: dropout at inference, cancelling transposes/permutes, no-op reshapes and casts."""

from equivalence import ir_after
from passcase import property_test

BEFORE = """specc: 1
name: ident
inputs:
  x: f32[B, T, 4]
graph: |
  a = dropout(x, p=0.1)
  b = transpose(transpose(a, 1, 2), 2, 1)
  c = reshape(reshape(b, B, T, 2, 2), B, T, 4)
  d = permute(permute(relu(c), 0, 2, 1), 0, 2, 1)
  y = cast(d, f32)
outputs:
  y:
"""

EXPECTED = """graph ident
  dims B=2, T=8
  %0: f32[B, T, 4] = input(name="x")
  %6: f32[B, T, 4] = relu(%0)
  return y=%6
"""


def test_before_expected():
    assert ir_after(BEFORE, "eliminate_identity") == EXPECTED


def test_dropout_stays_in_a_training_build():
    import specc
    from specc.compiler.passes import PASSES, PassContext, optimize

    ctx = PassContext(opt_level=2, disabled=frozenset(set(PASSES) - {"eliminate_identity"}), inference=False)
    graph, _ = optimize(specc.compile(BEFORE), ctx)
    assert [n.op for _, n in graph.nodes()].count("dropout") == 1


def test_transposes_that_do_not_cancel_stay():
    text = """specc: 1
name: keep
inputs:
  x: f32[B, T, 4]
graph: |
  y = transpose(transpose(x, 1, 2), 0, 2)
outputs:
  y:
"""
    assert ir_after(text, "eliminate_identity").count("transpose(") == 2


test_property = property_test("eliminate_identity", [
    "dropout({v}, p=0.3)", "transpose(transpose({v}, 1, 2), 2, 1)", "permute(permute({v}, 0, 2, 1), 0, 2, 1)",
    "reshape(reshape({v}, B, T, {w}, 1), B, T, {w})", "permute({v}, 0, 1, 2)",
])  # (cast(x, f32) is in BEFORE: an explicit cast would pin the float64 oracle to float32)
