"""fold_batch_norm and merge_parallel_convs: BN folding and RepConv / RepVGG re-parameterisation."""

import torch
from hypothesis import strategies as st

import specc
from equivalence import build, ir_after, only, perturbed_weights
from passcase import property_test

REP = """specc: 1
name: rep
params:
  c: 8
inputs:
  x: f32[B, c, 16, 16]
blocks:
  conv_bn(h, out, k, p): |
    return batch_norm(conv2d(h, out, k, padding=p, bias=false))
  repconv(h): |
    return silu(conv_bn(h, c, 3, 1) + conv_bn(h, c, 1, 0))
  repvgg(h): |
    return relu(conv_bn(h, c, 3, 1) + conv_bn(h, c, 1, 0) + h)
graph: |
  y = repvgg(repconv(x))
outputs:
  y:
"""

FOLDED = """graph rep
  params c=8
  dims B=2
  %0: f32[B, 8, 16, 16] = input(name="x")
  %2: f32[B, 8, 16, 16] = conv2d(%0, out=8, kernel=3, stride=1, padding=1, dilation=1, groups=1, bias=true)  @repconv.conv_bn.conv2d {weight: f32[8, 8, 3, 3], bias: f32[8]}
  %4: f32[B, 8, 16, 16] = conv2d(%0, out=8, kernel=1, stride=1, padding=0, dilation=1, groups=1, bias=true)  @repconv.conv_bn_1.conv2d {weight: f32[8, 8, 1, 1], bias: f32[8]}
  %5: f32[B, 8, 16, 16] = add(%2, %4)
  %6: f32[B, 8, 16, 16] = silu(%5)
  %8: f32[B, 8, 16, 16] = conv2d(%6, out=8, kernel=3, stride=1, padding=1, dilation=1, groups=1, bias=true)  @y.conv_bn.conv2d {weight: f32[8, 8, 3, 3], bias: f32[8]}
  %10: f32[B, 8, 16, 16] = conv2d(%6, out=8, kernel=1, stride=1, padding=0, dilation=1, groups=1, bias=true)  @y.conv_bn_1.conv2d {weight: f32[8, 8, 1, 1], bias: f32[8]}
  %11: f32[B, 8, 16, 16] = add(%8, %10)
  %12: f32[B, 8, 16, 16] = add(%11, %6)
  %13: f32[B, 8, 16, 16] = relu(%12)
  return y=%13
"""


def test_fold_batch_norm_before_expected():
    assert ir_after(REP, "fold_batch_norm") == FOLDED


def test_repconv_becomes_one_conv_per_block():
    from specc.compiler.passes import PASSES, PassContext, optimize
    from specc.compiler.printer import print_graph

    keep = {"fold_batch_norm", "merge_parallel_convs"}
    ctx = PassContext(opt_level=2, disabled=frozenset(set(PASSES) - keep), verify_each=True)
    graph, _ = optimize(specc.compile(REP), ctx)
    ir = print_graph(graph, show_span=False)
    assert ir.count("conv2d(") == 2 and "batch_norm" not in ir and "add(" not in ir
    assert "kernel=[3, 3]" in ir and "padding=[1, 1]" in ir


def test_folded_weights_follow_the_formula():
    text = """specc: 1
name: cb
inputs:
  x: f32[B, 3, 6, 6]
graph: |
  y = batch_norm(conv2d(x, 4, 3))
outputs:
  y:
"""
    graph = specc.compile(text)
    w = perturbed_weights(graph)
    model, _ = build(text, only("fold_batch_norm"), w)
    d = {k: v.double() for k, v in w.items()}
    s = d["y.weight"] / torch.sqrt(d["y.running_var"] + 1e-5)
    want_w = d["conv2d.weight"] * s.reshape(4, 1, 1, 1)
    want_b = (d["conv2d.bias"] - d["y.running_mean"]) * s + d["y.bias"]
    conv = dict(model.named_parameters())
    (wname,) = [k for k in conv if k.endswith("weight")]
    (bname,) = [k for k in conv if k.endswith("bias")]
    assert (conv[wname].double() - want_w).abs().max() < 1e-6
    assert (conv[bname].double() - want_b).abs().max() < 1e-6


def test_training_builds_keep_batch_norm():
    from specc.compiler.passes import PassContext, optimize

    graph, _ = optimize(specc.compile(REP), PassContext(opt_level=2, inference=False))
    assert sum(n.op == "batch_norm" for _, n in graph.nodes()) == 4


@st.composite
def conv_specs(draw):
    c = draw(st.sampled_from([2, 4]))
    k = draw(st.sampled_from([(3, 1), (5, 2), (1, 0)]))
    groups = draw(st.sampled_from([1, c]))
    bias = draw(st.booleans())
    affine = draw(st.booleans())
    branch = draw(st.sampled_from(["", " + batch_norm(conv2d(x, {c}, 1, groups={g}, bias=false))", " + x"]))
    if branch == " + x" and groups != 1:
        branch = ""
    body = (f"y = relu(batch_norm(conv2d(x, {c}, {k[0]}, padding={k[1]}, groups={groups}, "
            f"bias={str(bias).lower()}), affine={str(affine).lower()})" + branch.format(c=c, g=groups) + ")")
    return (f"specc: 1\nname: g\ninputs:\n  x: f32[B, {c}, 7, 7]\ngraph: |\n  {body}\n"
            f"outputs:\n  y:\n")


test_property_fold = property_test("fold_batch_norm", [], spec_strategy=conv_specs())


@st.composite
def parallel_specs(draw):
    c = draw(st.sampled_from([2, 4]))
    stride = draw(st.sampled_from([1, 2]))
    extra = draw(st.sampled_from(["", " + x"])) if stride == 1 else ""
    big = draw(st.sampled_from([(3, 1), (5, 2)]))
    return (f"specc: 1\nname: g\ninputs:\n  x: f32[B, {c}, 8, 8]\ngraph: |\n"
            f"  y = conv2d(x, {c}, {big[0]}, stride={stride}, padding={big[1]}) + "
            f"conv2d(x, {c}, 1, stride={stride}){extra}\noutputs:\n  y:\n")


test_property_merge = property_test("merge_parallel_convs", [], spec_strategy=parallel_specs())
