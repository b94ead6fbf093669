"""`//` (floordiv) and `%` (mod) on tensors, and `/` by a constant zero.

floordiv is torch's floor division (torch.floor_divide, rounding_mode="floor": toward -inf; on floats
c10's div_floor_floating, as Python's float //), mod torch.remainder (the sign of the divisor, as Python's
%). Integers stay integers; a float on either side gives a float. An integer division or remainder by a
constant zero is a located error at spec time (torch raises at run time). `/` by a constant zero gives
IEEE's +-inf (nan for 0 / 0) on both backends (TVM's constant folder refused it).

References are torch's own operators on float64 and int64 tensors. The float operands are multiples of
1/8 in [-8, 8] and the divisors multiples of 1/4: fmod is exact, and so is every other step of both
formulas, in float32 as in float64, so results are compared exactly (equal bits, up to the sign of a zero
result, which is compared too) on the float64 torch module, the float32 one and tvm-llvm (float32).
Random normal operands are compared exactly against torch in float32 (TVM computes torch's formula).
"""

from __future__ import annotations

import functools

import pytest
import torch

import specc
from opcheck import assert_error, flops_of, output_types, spec_text

spec = functools.partial(spec_text, dims="B: 3, d: 4")

# every case of one graph: x, y float [B, d]; w a float [d] row; i, j integer [B, d]
GRAPH = """\
fd = x // y
fm = x % y
bd = x // w
bm = x % w
ls = x // 0.75
rs = 3.5 % y
ni = -7 % y
id = i // j
im = i % j
il = i // 3
ir = -13 % j
mf = i // y
mg = x % j
cf = i % 2.5
"""
OUTS = "fd fm bd bm ls rs ni id im il ir mf mg cf"


def reference(x, y, w, i, j) -> dict[str, torch.Tensor]:
    """What torch computes, on float64 / int64 tensors (Python scalars as torch takes them)."""
    x, y, w = x.double(), y.double(), w.double()
    return {"fd": x // y, "fm": torch.remainder(x, y), "bd": x // w, "bm": x % w, "ls": x // 0.75,
            "rs": torch.remainder(torch.full_like(y, 3.5), y), "ni": torch.remainder(torch.full_like(y, -7.0), y),
            "id": torch.div(i, j, rounding_mode="floor"), "im": torch.remainder(i, j), "il": i // 3,
            "ir": torch.remainder(torch.full_like(j, -13), j), "mf": i.double() // y, "mg": x % j.double(),
            "cf": torch.remainder(i.double(), 2.5)}


TEXT = spec("x: 'f32[B, d]', y: 'f32[B, d]', w: 'f32[d]', i: 'i64[B, d]', j: 'i64[B, d]'", GRAPH, OUTS)


def operands(seed: int = 0, rows: int = 3):
    """Exactly representable operands: x in (1/8) Z of [-8, 8], divisors in (1/4) Z of [-4, 4] less 0,
    integers in [-20, 20] over nonzero integer divisors in [-6, 6]; both signs of each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-64, 65, (rows, 4), generator=g) / 8.0
    x[0, 0], x[0, 1] = -0.0, 0.0
    nz = lambda n, hi: (torch.randint(1, hi + 1, n, generator=g) * (torch.randint(0, 2, n, generator=g) * 2 - 1))  # noqa: E731
    y = nz((rows, 4), 16) / 4.0
    w = torch.tensor([-1.5, 0.75, 2.0, -0.25])
    i = torch.randint(-20, 21, (rows, 4), generator=g)
    j = nz((rows, 4), 6)
    return x, y, w, i, j


def same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    if want.is_floating_point():
        got = got.double()
        assert torch.equal(got.isnan(), want.isnan()), what
        ok = ~want.isnan()
        assert torch.equal(got[ok], want[ok]), f"{what}: {got} vs {want}"
        assert torch.equal(got[ok].signbit(), want[ok].signbit()), f"{what}: the sign of a zero"
    else:
        assert torch.equal(got, want), f"{what}: {got} vs {want}"


def test_types_follow_the_promotion_of_the_other_operators():
    assert output_types(TEXT) == ["f32[B, d]"] * 7 + ["i64[B, d]"] * 4 + ["f32[B, d]"] * 3
    mixed = spec("a: 'i32[B, d]', b: 'i64[B, d]', h: 'f16[B, d]'", "p = a // b\nq = a % 2\nr = h // 2\ns = a % h",
                 "p q r s")
    assert output_types(mixed) == ["i64[B, d]", "i32[B, d]", "f16[B, d]", "f16[B, d]"]


def test_binary_ops_promote_as_torch_and_refuse_what_has_no_dtype():
    """Every pair of specc's dtypes combines to torch.promote_types' dtype, except u8 with i8: torch
    gives int16, which specc has no dtype for, so the spec is refused where the two meet."""
    from specc.compiler.ir import DTYPES
    from specc.compiler.ops import promote
    from specc.compiler.registry import OpError

    for a in DTYPES:
        for b in DTYPES:
            want = torch.promote_types(getattr(torch, DTYPES[a]), getattr(torch, DTYPES[b]))
            if want == torch.int16:
                with pytest.raises(OpError, match="u8 and i8 combine to int16 in torch"):
                    promote(a, b, "add")
            else:
                assert getattr(torch, DTYPES[promote(a, b, "add")]) == want, (a, b)
    message = ("{}: u8 and i8 combine to int16 in torch, which specc has no dtype for: cast one of them first, "
               "e.g. cast(x, i32)")
    for graph, col, op in (("y = a + b", 11, "add"), ("y = maximum(b, a)", 18, "maximum"),
                           ("y = where(a > 1, a, b)", 23, "where")):
        assert_error(spec("a: 'u8[B, d]', b: 'i8[B, d]'", graph), 6, col, message.format(op))
    assert output_types(spec("a: 'u8[B, d]', b: 'i8[B, d]'", "y = cast(a, i32) + b\nz = a + 1", "y z")) == \
        ["i32[B, d]", "u8[B, d]"]


@pytest.mark.parametrize("opt_level", [0, 1, 2])
def test_torch_matches_torch_float64_and_int64(opt_level):
    model = specc.load(TEXT, opt_level=opt_level)
    for seed in range(3):
        x, y, w, i, j = operands(seed)
        want = reference(x, y, w, i, j)
        for dtype in (torch.float64, torch.float32):
            m = model.to(dtype)
            with torch.no_grad():
                got = m(x.to(dtype), y.to(dtype), w.to(dtype), i, j)
            for name, g in zip(OUTS.split(), got):
                if want[name].is_floating_point():
                    assert g.dtype == dtype, name
                same(g, want[name], f"-O{opt_level} {dtype} {name}")


def test_flops_count_one_per_element():
    assert flops_of(TEXT, "floordiv") == 6 * 12 and flops_of(TEXT, "mod") == 8 * 12  # B * d = 12


def test_integer_division_by_a_constant_zero_is_a_located_error():
    ints = "i: 'i64[B, d]'"
    assert_error(spec(ints, "y = i // 0"), 6, 12,
                 "integer division by zero: '//' of the integer tensor i64[B, d] by the constant 0")
    assert_error(spec(ints, "y = i % 0"), 6, 11,
                 "integer remainder by zero: '%' of the integer tensor i64[B, d] by the constant 0")
    assert_error(spec_text(ints, "y = i % (n - n)", dims="B: 3, d: 4", params="{n: 3}"), 7, 12,
                 "integer remainder by zero: '%' of the integer tensor i64[B, d] by the constant 0")
    # a float on either side: IEEE's inf / nan, as torch
    assert output_types(spec(ints, "y = i // 0.0\nz = i % 0.0\nu = i / 0", "y z u")) == ["f32[B, d]"] * 3
    assert_error(spec("b: 'bool[B, d]'", "y = b // b"), 6, 7, "floordiv: needs numbers, got bool[B, d] and bool[B, d]")


def test_float_division_and_remainder_by_zero_are_ieee():
    text = spec("x: 'f32[B, d]'", "a = x // 0\nb = x % 0.0\nc = x / 0\ne = x / -0.0", "a b c e")
    model = specc.load(text).double()
    x = torch.tensor([[1.0, -1.0, 0.0, 2.5]] * 3, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
    for g, w in zip(got, (x // 0, torch.remainder(x, 0.0), x / 0, x / -0.0)):
        same(g, w, "by zero")


# -- TVM ----------------------------------------------------------------------------------------------

ZERO = """\
za = x / 0
zb = x / -0.0
zc = x / (y * 0)
zd = x / (0 * y)
ze = x / zeros(B, d)
zf = x // 0.0
zg = x % 0
zh = y * 0
zi = 0 / x
zj = x / (y - y)
zk = x / (zeros(B, d) * y)
zl = x / (ones(B, d) * y - y)
"""
ZOUTS = "za zb zc zd ze zf zg zh zi zj zk zl"
#: divisors TIR's simplifier may fold to +0 (y - y, 0 * y: not IEEE's nan for an inf y, nor the -0.0 of
#: zeros * y for a negative y, which it keeps or not by how the kernels fuse): these compile (the folder
#: refused a division by the 0 it made) and give x / 0 where y is finite (zk: up to the sign)
FOLDED = ("zj", "zk", "zl")


def zero_reference(x, y) -> dict[str, torch.Tensor]:
    zeros = torch.zeros_like(x)
    return {"za": x / 0, "zb": x / -0.0, "zc": x / (y * 0), "zd": x / (0 * y), "ze": x / zeros, "zf": x // 0.0,
            "zg": torch.remainder(x, 0.0), "zh": y * 0, "zi": 0 / x}


def test_tvm_llvm_matches_torch():
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph
    from specc.compiler.passes import PassContext, optimize

    text = spec("x: 'f32[B, d]', y: 'f32[B, d]', w: 'f32[d]', i: 'i64[B, d]', j: 'i64[B, d]'", GRAPH + ZERO,
                OUTS + " " + ZOUTS)
    graph, _ = optimize(specc.compile(text), PassContext(opt_level=2))
    runner = compile_graph(graph, weights={})
    names = (OUTS + " " + ZOUTS).split()
    for seed, rows in ((0, 3), (1, 5)):
        x, y, w, i, j = operands(seed, rows)
        x[1, :2], y[1, :2] = torch.tensor([float("inf"), float("nan")]), torch.tensor([-float("inf"), -2.0])
        want = {**reference(x, y, w, i, j), **zero_reference(x.double(), y.double())}
        got = dict(zip(names, runner(x, y, w, i, j)))
        finite = y.isfinite()
        for name in FOLDED:
            g, w = got[name][finite], (x.double() / 0)[finite]
            same(g.abs() if name == "zk" else g, w.abs() if name == "zk" else w, f"tvm {name} at B={rows}")
        for name in (n for n in names if n not in FOLDED):
            assert got[name].dtype == (torch.float32 if want[name].is_floating_point() else torch.int64), name
            same(got[name], want[name], f"tvm {name} at B={rows}")
    # random floats: torch's float32 formula, exactly (TVM's own floor(x / y) rounds differently)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 4, generator=g) * 10, torch.randn(5, 4, generator=g)
    x[0, :2], y[0, :2] = 1.0, 0.1  # 1 // 0.1 is 9 (floor(1 / 0.1) would be 10)
    w, i, j = torch.randn(4, generator=g), *operands(4, 5)[3:]
    got = dict(zip(names, runner(x, y, w, i, j)))
    for name, want in (("fd", x // y), ("fm", x % y), ("bd", x // w), ("bm", x % w), ("ls", x // 0.75),
                       ("rs", torch.remainder(torch.full_like(y, 3.5), y))):
        same(got[name], want.double(), f"tvm float32 {name}")
    assert got["fd"][0, 0].item() == 9.0


def test_an_integer_divisor_that_is_zero_at_run_time_raises_as_torch_does():
    """torch raises RuntimeError("ZeroDivisionError") for an integer // or % by a 0 it meets at run time; so
    does tvm-llvm's library (a checking kernel before the division), naming where in the spec; the torch
    build raises torch's own."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph

    text = spec("i: 'i64[B, d]', j: 'i64[B, d]', k: 'i32[d]'", "a = i // j\nb = i % k", "a b")
    runner = compile_graph(specc.compile(text), weights={})
    model = specc.load(text)
    i, j, k = torch.tensor([[7, -7, 9, 3]] * 3), torch.tensor([[2, 2, -4, 1]] * 3), torch.tensor([3, 1, 2, 5])
    for got, want in zip(runner(i, j, k.int()), (torch.div(i, j, rounding_mode="floor"), torch.remainder(i, k))):
        assert torch.equal(got, want)
    zero_j = j.clone()
    zero_j[1, 2] = 0
    for args, where in (((i, zero_j, k), "'//' at line 6, column 7"), ((i, j, torch.tensor([3, 0, 2, 5])),
                                                                       "'%' at line 7, column 7")):
        with pytest.raises(RuntimeError, match="^ZeroDivisionError$"):
            model(*args[:2], args[2].int())
        with pytest.raises(RuntimeError) as info:
            runner(*args[:2], args[2].int())
        assert str(info.value) == f"ZeroDivisionError ({where} of the spec)"
