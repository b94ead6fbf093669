"""attention_sdpa: softmax attention onto torch's scaled_dot_product_attention kernel."""

from equivalence import ir_after
from passcase import property_test

BEFORE = """specc: 1
name: sdpa
inputs:
  x: f32[B, T, 8]
graph: |
  y = attention(x, heads=2, causal=true)
outputs:
  y:
"""

EXPECTED = """graph sdpa
  dims B=2, T=8
  %0: f32[B, T, 8] = input(name="x")
  %1: f32[B, T, 8] = attention(%0, heads=2, causal=true, bias=true, dropout=0.0, qkv=false, impl="sdpa", head_dim=none, rope=none, rope_dim=none)  @y {q.weight: f32[8, 8], q.bias: f32[8], k.weight: f32[8, 8], k.bias: f32[8], v.weight: f32[8, 8], v.bias: f32[8], o.weight: f32[8, 8], o.bias: f32[8]}
  return y=%1
"""


def test_before_expected():
    assert ir_after(BEFORE, "attention_sdpa") == EXPECTED


def test_generated_code_calls_the_fused_kernel():
    from equivalence import build, only

    _, files = build(BEFORE, only("attention_sdpa", opt_level=1))
    src = files["model.py"].decode()
    assert "MultiHeadAttention(8, heads=2, causal=True, sdpa=True)" in src
    assert "F.scaled_dot_product_attention" in src


test_property = property_test("attention_sdpa", ["attention({v}, heads=2)", "attention({v}, heads=2, causal=true)",
                                                 "attention({v}, heads=1, kv=tanh({v}))"])
#: rotary embeddings (attention's rope=) survive the rewrite: every example holds a rope attention
test_property_rope = property_test("attention_sdpa", ["attention({v}, heads=2, causal=true, rope=100.0, rope_dim=2)",
                                                      "attention({v}, heads=1, rope=10000)"], examples=8)
