"""sin, cos, rsqrt, erf, floor, ceil, round, sign, softplus, leaky_relu, elu, hardswish, mish; flip and stack.

References are torch's own functions on float64 tensors. The inputs hold halves (round's ties go to even,
as torch.round), both zeros, +-inf, nan, and values past softplus's threshold. The float64 module is held to
tests/opcheck.TOL (the same functions); tvm-llvm (float32) to 1e-5 relative and 2e-6 absolute, nan where
torch gives nan (TVM's erf clamps its argument, which turned a nan into 1: kept as nan here), and a zero
with torch's sign (elu(-0.0) is -0.0: TVM's exp(x) - 1 gave +0.0).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import specc
from opcheck import TOL, assert_error, flops_of, output_types, spec_text

spec = functools.partial(spec_text, dims="B: 2, d: 14")

#: (spec expression, float64 reference)
UNARY = [
    ("sin(x)", torch.sin), ("cos(x)", torch.cos), ("rsqrt(x)", torch.rsqrt), ("erf(x)", torch.erf),
    ("floor(x)", torch.floor), ("ceil(x)", torch.ceil), ("round(x)", torch.round), ("sign(x)", torch.sign),
    ("softplus(x)", F.softplus), ("softplus(x, beta=2.0, threshold=5.0)", lambda t: F.softplus(t, 2.0, 5.0)),
    ("leaky_relu(x)", F.leaky_relu), ("leaky_relu(x, negative_slope=0.2)", lambda t: F.leaky_relu(t, 0.2)),
    ("elu(x)", F.elu), ("elu(x, alpha=0.5)", lambda t: F.elu(t, 0.5)), ("hardswish(x)", F.hardswish),
    ("mish(x)", F.mish),
]
NAMES = [f"u{k}" for k in range(len(UNARY))]
TEXT = spec("x: 'f32[B, d]'", "".join(f"{n} = {e}\n" for n, (e, _) in zip(NAMES, UNARY)), " ".join(NAMES))
NAN, INF = float("nan"), float("inf")


def special_inputs(rows: int = 2) -> torch.Tensor:
    row = [0.5, 1.5, 2.5, -0.5, -2.5, NAN, -0.0, 0.0, INF, -INF, 30.0, -30.0, 3.7, -1e-3]
    x = torch.tensor([row] * rows)
    return x + torch.linspace(0, 0.25, rows)[:, None] * (torch.arange(14) % 3 == 2)  # other rows move some values


def check(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    assert got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: {got} vs {want}"
    ok = ~want.isnan()
    assert torch.allclose(got.double()[ok], want[ok], rtol=rtol, atol=atol), f"{what}: {got} vs {want}"
    zero = want == 0
    assert torch.equal(got[zero].signbit(), want[zero].signbit()), f"{what}: the sign of a zero: {got} vs {want}"


def test_types_and_flops():
    assert output_types(TEXT) == ["f32[B, d]"] * len(UNARY)
    assert output_types(spec("h: 'f16[B, d]'", "y = mish(h)\nz = round(h)", "y z")) == ["f16[B, d]"] * 2
    assert flops_of(TEXT, "sin") == 4 * 28 and flops_of(TEXT, "floor") == 28 and flops_of(TEXT, "mish") == 8 * 28


def test_errors_are_located():
    assert_error(spec("i: 'i64[B, d]'", "y = sin(i)"), 6, 11, "sin: expected a floating-point tensor for 'x', got i64[B, d]")
    assert_error(spec("x: 'f32[B, d]'", "y = elu(x, alpha='a')"), 6, 14,
                 "elu(): argument 'alpha' must be a number, got the string 'a'")


@pytest.mark.parametrize("opt_level", [0, 2])
def test_torch_matches_torch_float64(opt_level):
    model = specc.load(TEXT, opt_level=opt_level).double()
    x = special_inputs().double()
    with torch.no_grad():
        got = model(x)
    for (expr, ref), g in zip(UNARY, got):
        assert g.dtype == torch.float64
        check(g, ref(x), 0.0, TOL, f"-O{opt_level} {expr}")


def test_tvm_llvm_matches_torch():
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph
    from specc.compiler.passes import PassContext, optimize

    graph, _ = optimize(specc.compile(TEXT), PassContext(opt_level=2))
    runner = compile_graph(graph, weights={})
    for rows in (1, 3):
        x = special_inputs(rows)
        for (expr, ref), g in zip(UNARY, runner(x)):
            assert g.dtype == torch.float32
            check(g, ref(x.double()), 1e-5, 2e-6, f"tvm {expr} at B={rows}")


# -- flip and stack ---------------------------------------------------------------------------------

SHAPES = spec_text("x: 'f32[B, T, 3]', i: 'i64[B, T] in range(5)'", """\
s = stack([x, x * 2.0, -x], dim=-1)
t = stack([x, flip(x, 1)])
f = flip(x, 1)
g = flip(x, [0, -1])
e = stack([i, flip(i, 1)], dim=1)
k = embedding(e, 5, 2)
""", "s t f g e k", dims="B: 2, T: 4")


def shape_reference(x: torch.Tensor, i: torch.Tensor, table: torch.Tensor) -> list[torch.Tensor]:
    e = torch.stack([i, i.flip(1)], dim=1)
    return [torch.stack([x, x * 2, -x], dim=-1), torch.stack([x, x.flip(1)]), x.flip(1), x.flip((0, 2)), e,
            table[e]]


def test_flip_and_stack_types():
    assert output_types(SHAPES) == ["f32[B, T, 3, 3]", "f32[2, B, T, 3]", "f32[B, T, 3]", "f32[B, T, 3]",
                                    "i64[B, 2, T] in range(5)", "f32[B, 2, T, 2]"]
    ints = "x: 'f32[B, T]', y: 'f32[T, B]'"
    assert_error(spec_text(ints, "z = stack([x, y])"), 6, 17,
                 "stack: tensor 1 is f32[T, B], but tensor 0 is f32[B, T]: stacked tensors have one shape and dtype")
    assert_error(spec_text(ints, "z = stack([x], dim=3)"), 6, 18,
                 "stack: dimension 3 is out of range for a rank-3 tensor")
    assert_error(spec_text(ints, "z = flip(x, [1, -1])"), 6, 15, "flip: repeated dimension in [1, -1]")
    assert_error(spec_text(ints, "z = flip(x, [])"), 6, 15, "flip: dims=[] names no dimension")


@pytest.mark.parametrize("opt_level", [0, 2])
def test_flip_and_stack_match_torch(opt_level):
    model = specc.load(SHAPES, opt_level=opt_level).double()
    table = model.state_dict()["k.weight"]
    for rows, length in ((2, 4), (3, 1)):
        x = torch.randn(rows, length, 3, dtype=torch.float64)
        i = torch.randint(0, 5, (rows, length))
        with torch.no_grad():
            got = model(x, i)
        for g, w in zip(got, shape_reference(x, i, table)):
            assert torch.equal(g, w)


def test_flip_and_stack_on_tvm_llvm():
    pytest.importorskip("tvm")
    from specc.backends.pytorch.weights import init_weights
    from specc.backends.tvm.build import compile_graph
    from specc.compiler.passes import PassContext, optimize

    graph, _ = optimize(specc.compile(SHAPES), PassContext(opt_level=2))
    weights = init_weights(graph)
    runner = compile_graph(graph, weights=weights)
    for rows, length in ((2, 4), (3, 1)):
        x, i = torch.randn(rows, length, 3), torch.randint(0, 5, (rows, length))
        for g, w in zip(runner(x, i), shape_reference(x, i, weights["k.weight"])):
            assert torch.equal(g, w)
