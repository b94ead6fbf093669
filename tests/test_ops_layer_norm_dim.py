"""layer_norm(x, dim=d) and rms_norm(x, dim=d): a norm over one dimension other than the last, e.g.
ConvNeXt's channels-first LayerNorm, layer_norm(x, dim=1) on [B, C, H, W].

Oracle: the norms written out here in float64 (mean and biased variance over `dim` by sums, weight
and bias shaped to broadcast along `dim`), on seeded weights with noise (so that gains of 1 and zero
biases hide no mapping error). Checked: the generated float64 module at -O0, -O1 and -O2; tvm-llvm
(float32 and float64 inputs in one compile) at two sizes of the symbolic dimensions; parameter names
and shapes; that dim=-1 (and dim = the last dimension) generates exactly the code of no dim at all;
that fold_lookups leaves a norm over another dimension alone and CSE keeps norms of different dims
apart; FLOPs; argument errors at their line:col.

Tolerances: generated float64 module vs the float64 reference: max abs error <= 1e-12 (the same math
in a different order of float64 operations). tvm-llvm float32 outputs vs the float64 reference:
<= 1e-4 * max(1, max |reference|) (tests/test_tvm_ops.py's tolerance); its float64 outputs: <= 1e-12.
"""

from __future__ import annotations

import functools

import pytest
import torch

import specc
from equivalence import perturbed_weights
from opcheck import assert_error, close, flops_of, output_types, spec_text

TOL = 1e-12
TVM_TOL = 1e-4

spec = functools.partial(spec_text, dims="B: 2, H: 3")


def ln_ref(x, dim, weight=None, bias=None, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over dimension `dim`, the biased variance."""
    n = x.shape[dim]
    mean = x.sum(dim, keepdim=True) / n
    var = ((x - mean) ** 2).sum(dim, keepdim=True) / n
    y = (x - mean) / torch.sqrt(var + eps)
    return _affine(y, dim, weight, bias)


def rms_ref(x, dim, weight=None, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) * weight over dimension `dim`."""
    y = x / torch.sqrt((x * x).sum(dim, keepdim=True) / x.shape[dim] + eps)
    return _affine(y, dim, weight, None)


def _affine(y, dim, weight, bias):
    shape = [1] * y.dim()
    shape[dim] = -1
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


#: x [B, 6, H, 4]: norms over the channels (affine), over the symbolic H (no parameters, as a
#: parameter of size H is an error), and over the last dimension spelt 3 (the plain path).
GRAPH = """
a = layer_norm(x, dim=1)
b = layer_norm(x, dim=-3, affine=false, eps=0.001)
c = layer_norm(x, dim=2, affine=false)
d = rms_norm(x, dim=1)
e = rms_norm(x, dim=-2, affine=false)
f = layer_norm(x, dim=3, bias=false)
g = layer_norm(x, dim=1, bias=false, eps=0.01)
"""
TEXT = spec("x: 'f32[B, 6, H, 4]'", GRAPH, "a b c d e f g")


def expected(x, w):
    """The outputs a..g of TEXT on x, from the weights w (float64)."""
    w = {k: v.double() for k, v in w.items()}
    return (ln_ref(x, 1, w["a.weight"], w["a.bias"]),
            ln_ref(x, 1, eps=1e-3),
            ln_ref(x, 2),
            rms_ref(x, 1, w["d.weight"]),
            rms_ref(x, 2),
            ln_ref(x, 3, w["f.weight"]),
            ln_ref(x, 1, w["g.weight"], eps=1e-2))


def run64(text, opt_level, weights, seed=0, **dims):
    """The float64 module of `text` at `opt_level` with the -O0 `weights`: (its first input, outputs)."""
    model = specc.load(text, opt_level=opt_level, weights=weights).double()
    xs = [x.double() if x.is_floating_point() else x for x in model.example_inputs(seed=seed, **dims)]
    with torch.no_grad():
        out = model(*xs)
    return xs[0], out if isinstance(out, tuple) else (out,)


# ---------------------------------------------------------------------------------------------
# shapes, parameters, generated code
# ---------------------------------------------------------------------------------------------

def test_parameters_have_the_size_of_the_normalised_dimension():
    graph = specc.compile(TEXT)
    shapes = {".".join(n.path + (p.name,)): p.shape for _, n in graph.nodes() for p in n.params}
    assert shapes == {"a.weight": (6,), "a.bias": (6,), "d.weight": (6,), "f.weight": (4,), "g.weight": (6,)}
    assert output_types(TEXT) == ["f32[B, 6, H, 4]"] * 7


def _source(text: str, shown: str | None = None) -> str:
    """The generated model.py of `text` (at -O1, as `specc build` writes it); `shown`: the spec text
    its docstring quotes the hash of (default `text`)."""
    from specc.backends.pytorch.build import artifacts

    return artifacts(specc.compile(text), shown or text, "m.yaml")["model.py"].decode()


def test_generated_code_moves_the_dimension_last_and_back():
    src = _source(TEXT)
    assert "self.a = nn.LayerNorm(6, eps=1e-05)" in src
    assert "self.d = nn.RMSNorm(6, eps=1e-06)" in src
    assert "self.f = nn.LayerNorm(4, eps=1e-05, bias=False)" in src
    assert "a = self.a(x.movedim(1, -1)).movedim(-1, 1)" in src
    assert "b = F.layer_norm(x.movedim(-3, -1), (6,), eps=0.001).movedim(-1, -3)" in src
    assert "F.layer_norm(x.movedim(2, -1), (H,), eps=1e-05).movedim(-1, 2)" in src
    assert "e = F.rms_norm(x.movedim(-2, -1), (H,), eps=1e-06).movedim(-1, -2)" in src
    assert "f = self.f(x)" in src


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_dim_minus_one_and_the_last_dimension_generate_todays_code(op):
    base = spec("x: 'f32[B, T, 8]'", f"y = {op}(x)\nz = {op}(x, affine=false)", "y z", dims="B: 2, T: 5")
    want = _source(base)
    module = "nn.LayerNorm(8, eps=1e-05)" if op == "layer_norm" else "nn.RMSNorm(8, eps=1e-06)"
    eps = "1e-05" if op == "layer_norm" else "1e-06"
    assert f"self.y = {module}" in want and "y = self.y(x)" in want and f"z = F.{op}(x, (8,), eps={eps})" in want
    assert "movedim" not in want
    for dim in ("-1", "2"):
        text = base.replace(f"{op}(x)", f"{op}(x, dim={dim})").replace("affine=false)", f"affine=false, dim={dim})")
        assert _source(text, shown=base) == want
        assert [(p.name, p.shape) for _, n in specc.compile(text).nodes() for p in n.params] == \
            [(p.name, p.shape) for _, n in specc.compile(base).nodes() for p in n.params]


# ---------------------------------------------------------------------------------------------
# against the written-out reference, at every opt level
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_level", [0, 1, 2])
def test_torch_matches_the_reference(opt_level):
    weights = perturbed_weights(specc.compile(TEXT))
    for seed, dims in enumerate([{"B": 2, "H": 3}, {"B": 1, "H": 5}]):
        x, got = run64(TEXT, opt_level, weights, seed, **dims)
        for g, want in zip(got, expected(x, weights), strict=True):
            close(g, want, TOL)


#: Passes around a channels-first norm: an embedding before it (fold_lookups must not fold a norm
#: that mixes tokens into a table), a conv before it, dropout, and two parameter-free norms of one
#: input over different dimensions (CSE must keep them apart).
PASSES = spec_text("ids: 'i64[B, T] in range(10)', x: 'f32[B, 3, H, 5]'", """
e = embedding(ids, 10, 4)
p = layer_norm(e, dim=1, affine=false)
q = linear(layer_norm(e), 4)
r = layer_norm(dropout(conv2d(x, 6, 3, padding=1), p=0.0), dim=1)
s = layer_norm(x, dim=1, affine=false) + layer_norm(x, affine=false)
""", "p q r s", dims="B: 2, T: 7, H: 4")


def test_passes_leave_the_results_equal():
    from specc.compiler.passes import PassContext, optimize

    weights = perturbed_weights(specc.compile(PASSES))
    _, want = run64(PASSES, 0, weights)
    for level in (1, 2):
        _, got = run64(PASSES, level, weights)
        for name, g, w in zip("pqrs", got, want, strict=True):
            # -O2 folds q's chain into a table computed in float64 and stored as float32 (as the
            # embedding it replaces): float32 rounding, 2**-24 relative, on values below 4
            close(g, w, 1e-6 if (name, level) == ("q", 2) else TOL)
    graph, _ = optimize(specc.compile(PASSES), PassContext(opt_level=2))
    norms = sorted((n.attr("dim"), n.type.rank) for _, n in graph.nodes() if n.op == "layer_norm")
    # q's layer_norm over the last dimension folds into q's table; p's over T does not; both of s's stay
    assert norms == [(-1, 4), (1, 3), (1, 4), (1, 4)]


def test_reference_of_the_pass_spec():
    """The pass spec's outputs are what the written-out norms say (so that equal results mean right)."""
    weights = perturbed_weights(specc.compile(PASSES))
    w = {k: v.double() for k, v in weights.items()}
    model = specc.load(PASSES, opt_level=2, weights=weights).double()
    ids, x = model.example_inputs(seed=3)
    x = x.double()
    with torch.no_grad():
        p, _, r, s = model(ids, x)
    close(p, ln_ref(w["e.weight"][ids], 1), TOL)
    conv = torch.nn.functional.conv2d(x, w["conv2d.weight"], w["conv2d.bias"], padding=1)
    close(r, ln_ref(conv, 1, w["r.weight"], w["r.bias"]), TOL)
    close(s, ln_ref(x, 1) + ln_ref(x, 3), TOL)


def test_flops():
    text = spec("x: 'f32[B, 6, H, 4]'", "y = layer_norm(x, dim=1)\nz = rms_norm(x, dim=1)", "y z")
    assert flops_of(text, "layer_norm", B=2, H=3) == 5 * 2 * 6 * 3 * 4
    assert flops_of(text, "rms_norm", B=2, H=3) == 4 * 2 * 6 * 3 * 4


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

X = "x: 'f32[B, 6, H, 4]'"


def test_dim_out_of_range():
    assert_error(spec(X, "y = layer_norm(x, dim=4)"), 6, 21,
                 "layer_norm: dimension 4 is out of range for a rank-4 tensor")
    assert_error(spec(X, "y = rms_norm(x, eps=0.1, dim=-5)"), 6, 28,
                 "rms_norm: dimension -5 is out of range for a rank-4 tensor")


def test_dim_is_a_single_integer():
    assert_error(spec(X, "y = layer_norm(x, dim=[1, 2])"), 6, 21,
                 "layer_norm(): argument 'dim' must be an integer dimension index, got a list of 2 values")
    assert_error(spec(X, "y = layer_norm(x, dim=1.5)"), 6, 21,
                 "layer_norm(): argument 'dim' must be an integer dimension index, got the number 1.5")


def test_weights_over_a_symbolic_dimension():
    assert_error(spec(X, "y = layer_norm(x, dim=2)"), 6, 21,
                 "layer_norm: the normalised width (dimension 2 of x) must be a fixed size, but it is the "
                 "symbolic dimension H")
    assert_error(spec(X, "y = rms_norm(x, dim=-4)"), 6, 19,
                 "rms_norm: the normalised width (dimension 0 of x) must be a fixed size, but it is the "
                 "symbolic dimension B")
    # the last dimension keeps its message, at x
    assert_error(spec("x: 'f32[B, H]'", "y = layer_norm(x, dim=1)"), 6, 18,
                 "layer_norm: the normalised width (last dimension of x) must be a fixed size, but it is the "
                 "symbolic dimension H")


# ---------------------------------------------------------------------------------------------
# tvm-llvm
# ---------------------------------------------------------------------------------------------

#: TEXT's norms in one compile, on a float32 input and on a float64 one (the f64 norms' own path).
TVM_TEXT = spec("x: 'f32[B, 6, H, 4]', x64: 'f64[B, 6, H, 4]'", GRAPH + """
a64 = layer_norm(x64, dim=1)
d64 = rms_norm(x64, dim=-3)
c64 = layer_norm(x64, dim=2, affine=false)
""", "a b c d e f g a64 d64 c64")


def test_tvm_llvm_matches_the_reference():
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph

    graph = specc.compile(TVM_TEXT)
    weights = perturbed_weights(graph)
    runner = compile_graph(graph, weights=weights)
    w = {k: v.double() for k, v in weights.items()}
    model = specc.load(TVM_TEXT, opt_level=0)
    for seed, dims in enumerate([{"B": 2, "H": 3}, {"B": 1, "H": 7}]):
        x, x64 = model.example_inputs(seed=seed, **dims)
        got = runner(x, x64)
        want = expected(x.double(), weights) + (ln_ref(x64, 1, w["a64.weight"], w["a64.bias"]),
                                                 rms_ref(x64, 1, w["d64.weight"]), ln_ref(x64, 2))
        assert len(got) == len(want) == 10
        for i, (g, r) in enumerate(zip(got, want)):
            assert g.shape == r.shape, (i, g.shape, r.shape)
            err = (g.double() - r).abs().max().item()
            bound = TVM_TOL * max(1.0, r.abs().max().item()) if g.dtype == torch.float32 else TOL
            assert err <= bound, f"output {i} at {dims}: {err:.3g} > {bound:.3g}"
        assert [g.dtype for g in got] == [torch.float32] * 7 + [torch.float64] * 3


def test_tvm_relax_of_a_last_dimension_norm_is_unchanged():
    """dim=-1 and dim = the last dimension lower to the same Relax as no dim (tuning fingerprints stay)."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.tuning import fingerprint

    base = spec("x: 'f32[B, T, 8]'", "y = layer_norm(x)\nz = rms_norm(x)", "y z", dims="B: 2, T: 5")
    want = fingerprint(specc.compile(base))
    for dim in ("-1", "2"):
        text = base.replace("(x)", f"(x, dim={dim})")
        assert fingerprint(specc.compile(text)) == want


def test_tvm_cuda_codegen():
    """The CUDA path without a GPU (as tests/test_tvm_cuda.py): every kernel scheduled, CUDA C generated."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import device_source

    src = device_source(specc.compile(TVM_TEXT), {"kind": "cuda", "arch": "sm_90"})
    assert "__global__" in src
