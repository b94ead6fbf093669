"""fuse_qkv: self-attention's q, k and v projections become one matmul of width 3d."""

import torch

from equivalence import build, ir_after, only, perturbed_weights
from passcase import property_test

BEFORE = """specc: 1
name: qkv
inputs:
  x: f32[B, T, 8]
graph: |
  y = attention(x, heads=2)
  z = attention(y, heads=2, kv=x)
outputs:
  z:
"""

EXPECTED = """graph qkv
  dims B=2, T=8
  %0: f32[B, T, 8] = input(name="x")
  %1: f32[B, T, 8] = attention(%0, heads=2, causal=false, bias=true, dropout=0.0, qkv=true, impl="math", head_dim=none, rope=none, rope_dim=none)  @y {qkv.weight: f32[24, 8], qkv.bias: f32[24], o.weight: f32[8, 8], o.bias: f32[8]}
  %2: f32[B, T, 8] = attention(%1, %0, heads=2, causal=false, bias=true, dropout=0.0, qkv=false, impl="math", head_dim=none, rope=none, rope_dim=none)  @z {q.weight: f32[8, 8], q.bias: f32[8], k.weight: f32[8, 8], k.bias: f32[8], v.weight: f32[8, 8], v.bias: f32[8], o.weight: f32[8, 8], o.bias: f32[8]}
  return z=%2
"""


def test_before_expected():
    # cross-attention (kv=x) projects two different inputs: it keeps separate projections
    assert ir_after(BEFORE, "fuse_qkv") == EXPECTED


def test_fused_weight_is_the_concatenation():
    import specc

    graph = specc.compile(BEFORE)
    w = perturbed_weights(graph)
    model, _ = build(BEFORE, only("fuse_qkv"), w)
    want = torch.cat([w["y.q.weight"], w["y.k.weight"], w["y.v.weight"]])
    assert torch.equal(model.y.qkv.weight.detach(), want)


test_property = property_test("fuse_qkv", ["attention({v}, heads=2)", "attention({v}, heads=2, causal=true)",
                                           "attention(layer_norm({v}), heads=4, bias=false)"])
#: the fused projection is rotated as the q and k it replaces: every example holds a rope attention
test_property_rope = property_test("fuse_qkv", ["attention({v}, heads=2, rope=10000, rope_dim=2)",
                                                "attention({v}, heads=1, causal=true, rope=100.0)"], examples=8)
