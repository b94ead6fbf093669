"""merge_adapters: LoRA (W x + s B A x) and other parallel linear branches merged into the base weight."""

import torch

import specc
from equivalence import build, ir_after, only, perturbed_weights
from passcase import property_test

BEFORE = """specc: 1
name: lora
params:
  d: 16
  r: 2
  alpha: 4.0
inputs:
  x: f32[B, T, d]
blocks:
  lora_linear(h, out): |
    return linear(h, out) + (alpha / r) * linear(linear(h, r, bias=false), out, bias=false)
graph: |
  q = lora_linear(x, d)
  both = linear(q, 8) + linear(q, 8, bias=false)
  keep = linear(x, 8) + linear(tanh(x), 8)
outputs:
  both:
  keep:
"""

EXPECTED = """graph lora
  params d=16, r=2, alpha=4.0
  dims B=2, T=8
  %0: f32[B, T, 16] = input(name="x")
  %6: f32[B, T, 16] = linear(%0, out=16, bias=true, tie=none)  @q.linear {weight: f32[16, 16], bias: f32[16]}
  %9: f32[B, T, 8] = linear(%6, out=8, bias=true, tie=none)  @linear {weight: f32[8, 16], bias: f32[8]}
  %10: f32[B, T, 8] = linear(%0, out=8, bias=true, tie=none)  @linear_2 {weight: f32[8, 16], bias: f32[8]}
  %11: f32[B, T, 16] = tanh(%0)
  %12: f32[B, T, 8] = linear(%11, out=8, bias=true, tie=none)  @linear_3 {weight: f32[8, 16], bias: f32[8]}
  %13: f32[B, T, 8] = add(%10, %12)
  return both=%9, keep=%13
"""


def test_before_expected():
    # `keep` adds linear maps of two different inputs: not one linear map, so it stays
    assert ir_after(BEFORE, "merge_adapters") == EXPECTED


def test_merged_weight_is_w_plus_scaled_ba():
    graph = specc.compile(BEFORE)
    w = perturbed_weights(graph)
    model, _ = build(BEFORE, only("merge_adapters"), w)
    base, a, b = (w[f"q.{n}.weight"].double() for n in ("linear", "linear_1", "linear_2"))
    want = base + (4.0 / 2) * b @ a
    got = model.q.linear.weight.detach().double()
    assert (got - want).abs().max() < 1e-6  # float64 sum, rounded once to float32
    assert sum(p.numel() for p in model.parameters()) < sum(v.numel() for v in w.values())


test_property = property_test("merge_adapters", [
    "linear({v}, {w}) + 0.5 * linear(linear({v}, 2, bias=false), {w}, bias=false)",
    "linear({v}, {w}, bias=false) + linear(linear({v}, 3), {w})",
    "2.0 * linear({v}, {w})",
    "linear({v}, {w}) + linear({v}, {w})",
])
