"""fold_batch_norm and merge_parallel_convs: BN folding and RepConv / RepVGG re-parameterisation."""

import pytest
import torch
from hypothesis import strategies as st

import specc
from equivalence import ATOL, RTOL, build, ir_after, only, outputs, perturbed_weights
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
    body = (f"y = relu(batch_norm(conv2d(x, {c}, {k[0]}, padding={k[1]}, groups={groups}, "
            f"bias={str(bias).lower()}), affine={str(affine).lower()})" + branch.format(c=c, g=groups) + ")")
    return (f"specc: 1\nname: g\ninputs:\n  x: f32[B, {c}, 7, 7]\ngraph: |\n  {body}\n"
            f"outputs:\n  y:\n")


test_property_fold = property_test("fold_batch_norm", [], spec_strategy=conv_specs())


@st.composite
def parallel_specs(draw):
    c = draw(st.sampled_from([2, 4]))
    stride = draw(st.sampled_from([1, 2]))
    extra = draw(st.sampled_from(["", " + x", " + batch_norm(x)", " + batch_norm(x, affine=false)"])) \
        if stride == 1 else ""
    big = draw(st.sampled_from([(3, 1), (5, 2)]))
    return (f"specc: 1\nname: g\ninputs:\n  x: f32[B, {c}, 8, 8]\ngraph: |\n"
            f"  y = conv2d(x, {c}, {big[0]}, stride={stride}, padding={big[1]}) + "
            f"conv2d(x, {c}, 1, stride={stride}){extra}\noutputs:\n  y:\n")


test_property_merge = property_test("merge_parallel_convs", [], spec_strategy=parallel_specs())


# -- RepVGG's batch-normalised identity: relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)) -------------

def stats_perturbed(graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """perturbed_weights with BatchNorm statistics far from (0, 1): means in about [-1, 1], variances
    in [0.25, 4] and gains in about [0.5, 1.5], so a wrong scale or shift cannot hide in the tolerance."""
    w = perturbed_weights(graph, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for k, v in w.items():
        if k.endswith("running_mean"):
            w[k] = 0.5 * torch.randn(v.shape, generator=gen)
        elif k.endswith("running_var"):
            w[k] = 0.25 * 16 ** torch.rand(v.shape, generator=gen)
        elif k.endswith(".weight") and v.dim() == 1:  # a norm's gain
            w[k] = 0.5 + torch.rand(v.shape, generator=gen)
    return w


def assert_merged_equivalent(text: str, ctx) -> str:
    """Build `text` at -O0 (run in float64: the oracle) and with `ctx` (float32) on the same
    BN-perturbed weights; assert |got - want| <= ATOL + RTOL * |want| (1e-4 each). Returns the IR."""
    from specc.compiler.passes import PassContext, optimize
    from specc.compiler.printer import print_graph

    weights = stats_perturbed(specc.compile(text))
    reference, _ = build(text, PassContext(opt_level=0), weights)
    optimised, _ = build(text, ctx, weights)
    inputs = reference.example_inputs(seed=1)
    for want, have in zip(outputs(reference, inputs, torch.float64), outputs(optimised, inputs)):
        err = (have.double() - want).abs()
        assert bool((err <= ATOL + RTOL * want.abs()).all()), f"max error {float(err.max()):.3g}\n{text}"
    graph, _ = optimize(specc.compile(text), ctx)
    return print_graph(graph, show_span=False)


def fold_and_merge():
    from specc.compiler.passes import PASSES, PassContext

    keep = {"fold_batch_norm", "merge_parallel_convs"}
    return PassContext(opt_level=2, disabled=frozenset(set(PASSES) - keep), verify_each=True)


def repvgg_spec(body: str) -> str:
    return f"""specc: 1
name: rep
params:
  c: 8
inputs:
  x: f32[B, c, 10, 10]
blocks:
  conv_bn(h, out, k, p): |
    return batch_norm(conv2d(h, out, k, padding=p, bias=false))
  repvgg(h): |
    return relu({body})
graph: |
  y = repvgg(repvgg(x))
outputs:
  y:
"""


C3, C1 = "conv_bn(h, c, 3, 1)", "conv_bn(h, c, 1, 0)"


@pytest.mark.parametrize("body", [
    f"{C3} + {C1} + batch_norm(h)",                     # the paper's order
    f"batch_norm(h) + {C3} + {C1}",                     # identity first
    f"{C1} + batch_norm(h) + {C3}",                     # identity merged into the 1x1 first, then padded
    f"{C3} + ({C1} + batch_norm(h, affine=false))",     # nested the other way; no gain or shift
    f"batch_norm(h, eps=0.1) + {C1}",                   # two branches, eps other than the default
])
def test_repvgg_bn_identity_becomes_one_conv_per_block(body):
    ir = assert_merged_equivalent(repvgg_spec(body), fold_and_merge())
    assert ir.count("= conv2d(") == 2 and "batch_norm" not in ir and "add(" not in ir


@pytest.mark.parametrize("op, shape, branches", [
    ("conv2d", "6, 6", "conv2d(x, 4, 3, padding=1) + batch_norm(x) + conv2d(x, 4, 1)"),
    ("conv2d", "6, 6", "batch_norm(x, affine=false) + conv2d(x, 4, 3, padding=1, bias=false)"),
    ("conv1d", "9", "conv1d(x, 4, 3, padding=1) + conv1d(x, 4, 1) + batch_norm(x)"),
    ("conv1d", "9", "batch_norm(x) + conv1d(x, 4, 5, padding=2, bias=false)"),
])
def test_bn_identity_merges_into_plain_convs(op, shape, branches):
    """Without BN on the conv branches (nothing for fold_batch_norm to do), merge_parallel_convs alone."""
    text = f"specc: 1\nname: g\ninputs:\n  x: f32[B, 4, {shape}]\ngraph: |\n  y = {branches}\noutputs:\n  y:\n"
    ir = assert_merged_equivalent(text, only("merge_parallel_convs"))
    assert ir.count(f"= {op}(") == 1 and "batch_norm" not in ir and "add(" not in ir


def test_bn_identity_weights_follow_the_formula():
    """W' = W + diag(s) at the centre tap, b' = b + beta - mean * s, s = gamma / sqrt(var + eps)."""
    text = """specc: 1
name: g
inputs:
  x: f32[B, 4, 6, 6]
graph: |
  y = conv2d(x, 4, 3, padding=1) + batch_norm(x, eps=0.01)
outputs:
  y:
"""
    w = stats_perturbed(specc.compile(text))
    model, _ = build(text, only("merge_parallel_convs"), w)
    d = {k: v.double() for k, v in w.items()}
    s = d["batch_norm.weight"] / torch.sqrt(d["batch_norm.running_var"] + 0.01)
    want_w = d["conv2d.weight"].clone()
    want_w[range(4), range(4), 1, 1] += s
    want_b = d["conv2d.bias"] + d["batch_norm.bias"] - d["batch_norm.running_mean"] * s
    (conv,) = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert (conv.weight.double() - want_w).abs().max() < 1e-6
    assert (conv.bias.double() - want_b).abs().max() < 1e-6


@pytest.mark.parametrize("shape, graph, outs", [
    # batch_norm(x) read twice
    ("6, 6", "z = batch_norm(x)\n  y = conv2d(x, 4, 3, padding=1) + z\n  w = relu(z)", ["y", "w"]),
    # batch_norm(x) an output of its own
    ("6, 6", "z = batch_norm(x)\n  y = conv2d(x, 4, 3, padding=1) + z", ["y", "z"]),
    # stride 2 (on a 1x1 map, so that the shapes agree)
    ("1, 1", "y = conv2d(x, 4, 3, stride=2, padding=1) + batch_norm(x)", ["y"]),
    # dilated conv
    ("6, 6", "y = conv2d(x, 4, 3, padding=2, dilation=2) + batch_norm(x)", ["y"]),
    # batch_norm of another tensor
    ("6, 6", "y = conv2d(x, 4, 3, padding=1) + batch_norm(relu(x))", ["y"]),
])
def test_bn_identity_left_alone(shape, graph, outs):
    text = (f"specc: 1\nname: g\ninputs:\n  x: f32[B, 4, {shape}]\ngraph: |\n  {graph}\noutputs:\n"
            + "".join(f"  {o}:\n" for o in outs))
    ir = assert_merged_equivalent(text, only("merge_parallel_convs"))
    assert ir.count("= batch_norm(") == graph.count("batch_norm(") and "= add(" in ir


@pytest.mark.parametrize("graph", [
    "y = conv2d(x, 4, 3, padding=1, groups=2) + batch_norm(x)",
    "y = conv2d(x, 4, 3, padding=1, groups=4) + x",
    # MobileOne / grouped RepVGG: depthwise 3x3 + depthwise 1x1 + the batch-normalised identity
    "y = relu(batch_norm(conv2d(x, 4, 3, padding=1, groups=4, bias=false)) + "
    "batch_norm(conv2d(x, 4, 1, groups=4, bias=false)) + batch_norm(x))",
])
def test_grouped_identity_branches_merge(graph):
    """A grouped conv's identity tap is 1 at each output's own input within its group (input o mod the
    inputs per group), so the identity and batch-normalised identity branches merge as for groups=1."""
    text = f"specc: 1\nname: g\ninputs:\n  x: f32[B, 4, 6, 6]\ngraph: |\n  {graph}\noutputs:\n  y:\n"
    ir = assert_merged_equivalent(text, fold_and_merge())
    assert ir.count("= conv2d(") == 1 and "= add(" not in ir and "= batch_norm(" not in ir, ir


def test_shared_bn_identity_left_alone():
    """A batch_norm(x) whose parameters another batch_norm shares keeps them (checked on the IR: the
    PyTorch build of a shared batch_norm is not what this test is about)."""
    text = """specc: 1
name: g
inputs:
  x: f32[B, 4, 6, 6]
graph: |
  m = batch_norm(x)
  y = conv2d(x, 4, 3, padding=1) + batch_norm(x, share=m)
outputs:
  y:
  m:
"""
    ir = ir_after(text, "merge_parallel_convs")
    assert ir.count("= batch_norm(") == 2 and "= add(" in ir and "conv2d(%0, out=4, kernel=3," in ir


def test_training_builds_keep_the_bn_identity():
    from specc.compiler.passes import PASSES, PassContext, optimize
    from specc.compiler.printer import print_graph

    ctx = PassContext(opt_level=2, disabled=frozenset(set(PASSES) - {"merge_parallel_convs"}), inference=False)
    text = repvgg_spec("conv2d(h, c, 3, padding=1) + conv2d(h, c, 1) + batch_norm(h)")
    ir = print_graph(optimize(specc.compile(text), ctx)[0], show_span=False)
    # the two convs of each block still merge (exact in training too); the identity's BN does not
    assert ir.count("= batch_norm(") == 2 and ir.count("= conv2d(") == 2 and ir.count("= add(") == 2
