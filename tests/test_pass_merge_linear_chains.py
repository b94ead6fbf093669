"""merge_linear_chains: linear -> linear with nothing between them becomes one linear when cheaper."""

from equivalence import ir_after
from passcase import property_test

BEFORE = """specc: 1
name: chain
inputs:
  x: f32[B, 8]
graph: |
  h = linear(x, 4)
  y = linear(h, 8, bias=false)
  wide = linear(linear(x, 64), 8)
  bottleneck = linear(linear(x, 2), 8)
  shared = linear(x, 16)
  z = linear(shared, 8) + shared[:, :8]
outputs:
  y:
  wide:
  bottleneck:
  z:
"""

EXPECTED = """graph chain
  dims B=2
  %0: f32[B, 8] = input(name="x")
  %2: f32[B, 8] = linear(%0, out=8, bias=true, tie=none)  @y {weight: f32[8, 8], bias: f32[8]}
  %4: f32[B, 8] = linear(%0, out=8, bias=true, tie=none)  @wide {weight: f32[8, 8], bias: f32[8]}
  %5: f32[B, 2] = linear(%0, out=2, bias=true, tie=none)  @linear_1 {weight: f32[2, 8], bias: f32[2]}
  %6: f32[B, 8] = linear(%5, out=8, bias=true, tie=none)  @bottleneck {weight: f32[8, 2], bias: f32[8]}
  %7: f32[B, 16] = linear(%0, out=16, bias=true, tie=none)  @shared {weight: f32[16, 8], bias: f32[16]}
  %8: f32[B, 8] = linear(%7, out=8, bias=true, tie=none)  @linear_2 {weight: f32[8, 16], bias: f32[8]}
  %9: f32[B, 8] = getitem(%7, index=[:, :8])
  %10: f32[B, 8] = add(%8, %9)
  return y=%2, wide=%4, bottleneck=%6, z=%10
"""


def test_before_expected():
    # a bottleneck (8 -> 2 -> 8) is cheaper as two maps; a value used twice cannot disappear
    assert ir_after(BEFORE, "merge_linear_chains") == EXPECTED


def test_merged_weights_are_the_product():
    import torch

    from equivalence import build, only, perturbed_weights
    import specc

    text = BEFORE
    graph = specc.compile(text)
    w = perturbed_weights(graph)
    model, _ = build(text, only("merge_linear_chains"), w)
    want = (w["y.weight"].double() @ w["h.weight"].double()).float()
    assert torch.equal(model.y.weight.detach(), want)
    assert torch.allclose(model.y.bias.detach().double(), w["y.weight"].double() @ w["h.bias"].double(), atol=1e-6)


test_property = property_test("merge_linear_chains", [
    "linear(linear({v}, 32), {w})", "linear(linear({v}, 32, bias=false), {w})", "linear(linear({v}, 24), {w}, bias=false)",
    "linear(linear(linear({v}, 16), 32), {w})",
])
