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


AXES = """specc: 1
name: cse_axes
inputs:
  x: f32[B, 3, 4]
graph: |
  a = softmax(x, dim=1) + softmax(x, dim=-2)
  s = sum(x, dim=[0, -1]) + sum(x, dim=[2, 0])
  m = mean(x, dim=-1) + mean(x, dim=[2])
  u = unsqueeze(x, -1) + unsqueeze(x, 3)
  p = permute(x, [0, 2, 1]) + permute(x, [-3, -1, -2]) + transpose(permute(x, [0, 1, 2]), 1, 2)
  k = stack([x, x], dim=-1) + stack([x, x], dim=3)
  f = flip(x, [0, 2]) + flip(x, [-1, 0])
outputs:
  k:
  f:
  a:
  s:
  m:
  u:
  p:
"""


def test_axes_counted_from_either_end_are_one_computation():
    from specc.compiler.passes import PassContext, optimize

    import specc

    graph, _ = optimize(specc.compile(AXES), PassContext(opt_level=1, disabled=frozenset({"eliminate_identity"})))
    ops = sorted(n.op for _, n in graph.nodes() if n.op not in ("input", "add"))
    # one of each pair; the identity permute differs from the other two (and stays: eliminate_identity is off)
    assert ops == ["flip", "mean", "permute", "permute", "softmax", "stack", "sum", "transpose", "unsqueeze"], ops


STACKS = """specc: 1
name: cse_stack
inputs:
  x: f32[B, 2]
graph: |
  a = stack([x, x * 2.0], dim=-1)
  b = stack([x, x * 2.0], dim=1)
  c = stack([x, x * 2.0], dim=2)
outputs:
  a:
  b:
  c:
"""


def test_stacks_on_different_axes_stay_apart():
    """stack's dim counts in the result's rank: dim=-1 of [B, 2] inputs is dim 2, not dim 1."""
    import torch

    import specc

    x = torch.randn(3, 2, dtype=torch.float64)
    for level in (0, 1, 2):
        a, b, c = specc.load(STACKS, opt_level=level).double()(x)
        pair = (x, x * 2.0)
        assert torch.equal(a, torch.stack(pair, -1)) and torch.equal(b, torch.stack(pair, 1)), level
        assert torch.equal(c, torch.stack(pair, 2)), level


test_axes_property = property_test("cse", ["softmax({v}, dim=1) - softmax({v}, dim=-2) + {v}",
                                           "{v} - mean({v}, dim=-1, keepdim=true) + mean({v}, dim=[2], keepdim=true)"])


KV = """specc: 1
name: cse_kv
inputs:
  q: f32[B, 5, 8]
  k: f32[B, 5, 8]
  g: f32[B, 5, 4]
graph: |
  a = attend(q, k, k, heads=2) + attend(q, k, k, heads=2, kv_heads=2)
  b = attend(q, g, g, heads=2, kv_heads=1) + attend(q, g, g, heads=2, kv_heads=1)
outputs:
  a:
  b:
"""


def test_attend_with_a_key_head_per_query_head_is_attend():
    """kv_heads=heads means what no kv_heads means: one computation; a grouped attend stays itself."""
    from specc.compiler.passes import PassContext, optimize

    import specc

    graph, _ = optimize(specc.compile(KV), PassContext(opt_level=1))
    kv = sorted(str(n.attr("kv_heads")) for _, n in graph.nodes() if n.op == "attend")
    assert kv == ["1", "None"] or kv == ["1", "2"], kv


test_kv_property = property_test("cse", ["attend({v}, {v}, {v}, heads=2) - attend({v}, {v}, {v}, heads=2, "
                                         "kv_heads=2) + {v}"])
