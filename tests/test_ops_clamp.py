"""maximum, minimum and clamp, and nan through relu, amax and amin.

maximum(x, y) and minimum(x, y) are torch.maximum / torch.minimum (broadcasting, type promotion, nan where
either side is nan; a number on either side is a scalar of the other side's dtype); clamp(x, min, max) is
torch.clamp (nan stays nan; one bound may be left out). An integer clamp with integer bounds stays an integer
tensor whose value range the shape checker knows, so that clamped ids may index an embedding.

References are torch's own operators on float64 and int64 tensors. Each result is one of the operands (or a
bound), so the comparison is exact: equal values, nan where the reference has nan. The sign of a zero result
is not compared: torch's scalar and vectorised loops pick different operands when a -0.0 meets a 0.0.
The TVM backend is held to the same: TIR's max(a, b) (`a >= b ? a : b`) would drop a nan on the left, and
Relax's relu, maximum and max reduction with it.
"""

from __future__ import annotations

import functools

import pytest
import torch

import specc
from opcheck import assert_error, flops_of, output_types, spec_text

spec = functools.partial(spec_text, dims="B: 3, d: 4")
INPUTS = "x: 'f32[B, d]', y: 'f32[B, d]', w: 'f32[d]', i: 'i64[B, d]', j: 'i32[B, d]'"

GRAPH = """\
mx = maximum(x, y)
mn = minimum(x, y)
bw = maximum(x, w)
l0 = maximum(x, 0.0)
l1 = minimum(0.5, x)
mi = maximum(i, j)
ni = minimum(i, -2)
mf = maximum(i, x)
c2 = clamp(x, min=-0.5, max=1.25)
cl = clamp(x, min=0)
ch = clamp(x, max=-0.25)
ci = clamp(i, -3, 4)
cf = clamp(j, max=0.5)
ru = relu(x)
ax = amax(x, dim=1)
an = amin(x, dim=[0, 1])
ak = amax(x, dim=0, keepdim=true)
lr = mlp(x, 5, 3, act=relu)
"""
OUTS = "mx mn bw l0 l1 mi ni mf c2 cl ch ci cf ru ax an ak lr"
TEXT = spec_text(INPUTS, GRAPH, OUTS, dims="B: 3", params="{d: 4}")  # d a param: the mlp needs a fixed width
NAN, INF = float("nan"), float("inf")


def reference(x, y, w, i, j, lin=None) -> dict[str, torch.Tensor]:
    x, y, w = x.double(), y.double(), w.double()
    ref = {"mx": torch.maximum(x, y), "mn": torch.minimum(x, y), "bw": torch.maximum(x, w),
           "l0": torch.clamp(x, min=0.0), "l1": torch.clamp(x, max=0.5), "mi": torch.maximum(i, j.long()),
           "ni": torch.clamp(i, max=-2), "mf": torch.maximum(i.double(), x), "c2": torch.clamp(x, -0.5, 1.25),
           "cl": torch.clamp(x, min=0), "ch": torch.clamp(x, max=-0.25), "ci": torch.clamp(i, -3, 4),
           "cf": torch.clamp(j.double(), max=0.5), "ru": torch.relu(x), "ax": torch.amax(x, dim=1),
           "an": torch.amin(x, dim=[0, 1]), "ak": torch.amax(x, dim=0, keepdim=True)}
    if lin is not None:
        p = {k: v.double() for k, v in lin.items()}
        h = torch.relu(x @ p["fc1.weight"].T + p["fc1.bias"])
        ref["lr"] = h @ p["fc2.weight"].T + p["fc2.bias"]
    return ref


def operands(seed: int = 0, rows: int = 3, specials: bool = True):
    """Values in (1/4) Z of [-4, 4] (ties between x and y included), and nan, +-inf and both zeros where
    `specials`; integers in [-8, 8]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-16, 17, (rows, 4), generator=g) / 4.0
    y = torch.randint(-16, 17, (rows, 4), generator=g) / 4.0
    y[0, 0] = x[0, 0]
    w = torch.tensor([-1.5, 0.75, 2.0, -0.25])
    if specials:
        x[0, 1], y[0, 2] = NAN, NAN  # one side nan, the other side nan
        x[1, 0], y[1, 0] = NAN, NAN  # both
        x[1, 1], y[1, 2] = INF, -INF
        x[2, 0], y[2, 0] = -0.0, 0.0
    i = torch.randint(-8, 9, (rows, 4), generator=g)
    j = torch.randint(-8, 9, (rows, 4), generator=g, dtype=torch.int32)
    return x, y, w, i, j


def same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    if want.is_floating_point():
        got = got.double()
        assert torch.equal(got.isnan(), want.isnan()), f"{what}: {got} vs {want}"
        ok = ~want.isnan()
        assert torch.equal(got[ok], want[ok]), f"{what}: {got} vs {want}"
    else:
        assert torch.equal(got, want), f"{what}: {got} vs {want}"


def test_types():
    assert output_types(TEXT) == ["f32[B, 4]"] * 5 + ["i64[B, 4]"] * 2 + ["f32[B, 4]"] * 4 \
        + ["i64[B, 4] in range(-3, 5)"] + ["f32[B, 4]"] * 2 + ["f32[B]", "f32[]", "f32[1, 4]", "f32[B, 3]"]
    mixed = spec("a: 'i32[B, d]', h: 'f16[B, d]', u: 'u8[B, d]'",
                 "p = maximum(a, 2)\nq = minimum(h, 0.5)\nr = clamp(u, 1, 200)\ns = maximum(a, h)", "p q r s")
    assert output_types(mixed) == ["i32[B, d]", "f16[B, d]", "u8[B, d] in range(1, 201)", "f16[B, d]"]


def test_clamped_ids_index_an_embedding():
    ids = "ids: 'i64[B, d] in range(100)'"
    ok = spec(ids, "y = embedding(clamp(ids, 0, 9), 10, 3)\nz = embedding(clamp(ids, max=9), 10, 3)\n"
                   "u = embedding(clamp(ids - 50, min=0), 50, 3)", "y z u")
    assert output_types(ok) == ["f32[B, d, 3]"] * 3
    model = specc.load(ok)
    got = model(torch.tensor([[0, 9, 10, 99]] * 3))
    assert [tuple(t.shape) for t in got] == [(3, 4, 3)] * 3
    assert_error(spec(ids, "y = embedding(clamp(ids, 0, 10), 10, 3)"), 6, 17,
                 "embedding: ids take values in range(0, 11), outside the table of 10 rows")
    assert_error(spec(ids, "y = embedding(clamp(ids, min=1), 10, 3)"), 6, 17,
                 "embedding: ids take values in range(1, 100), outside the table of 10 rows")


def test_errors_are_located():
    assert_error(spec("x: 'f32[B, d]'", "y = clamp(x)"), 6, 7, "clamp: give min, max or both")
    assert_error(spec("x: 'f32[B, d]'", "y = clamp(x, 2, 1)"), 6, 19, "clamp: min (2) is greater than max (1)")
    assert_error(spec("b: 'bool[B, d]'", "y = clamp(b, 0, 1)"), 6, 13,
                 "clamp: x bool[B, d] is bool; clamp takes numbers")
    assert_error(spec("a: 'i32[B, d]'", "y = clamp(a, min=-3000000000)"), 6, 16,
                 "clamp: min -3000000000 does not fit x's dtype i32 (range(-2147483648, 2147483648))")
    assert_error(spec("b: 'bool[B, d]', x: 'f32[B, d]'", "y = maximum(b, x)"), 6, 15,
                 "maximum: needs numbers, got bool[B, d] and f32[B, d]; for bool tensors use logical_or")
    assert_error(spec("x: 'f32[B, d]', v: 'f32[5]'", "y = minimum(x, v)"), 6, 18,
                 "minimum: cannot broadcast x f32[B, d] with y f32[5]: dimension -1 is d vs 5")
    assert_error(spec("x: 'f32[B, d]'", "y = maximum(x, inf)"), 6, 18,
                 "maximum(): argument 'y' must be a finite number, got inf")


def test_flops_count_one_per_element():
    assert flops_of(TEXT, "maximum") == 5 * 12 and flops_of(TEXT, "clamp") == 5 * 12  # B * d = 12


@pytest.mark.parametrize("opt_level", [0, 1, 2])
def test_torch_matches_torch_float64(opt_level):
    model = specc.load(TEXT, opt_level=opt_level)
    lin = {k[len("lr."):]: v for k, v in model.state_dict().items() if k.startswith("lr.")}
    for seed in range(3):
        x, y, w, i, j = operands(seed)
        want = reference(x, y, w, i, j, lin)
        for dtype in (torch.float64, torch.float32):
            m = model.to(dtype)
            with torch.no_grad():
                got = m(x.to(dtype), y.to(dtype), w.to(dtype), i, j)
            for name, g in zip(OUTS.split(), got):
                if want[name].is_floating_point():
                    assert g.dtype == dtype, name
                    if name == "lr":  # a matmul: float32 rounding
                        assert torch.allclose(g.double(), want[name], atol=1e-5 if dtype == torch.float32
                                              else 1e-12, equal_nan=True), name
                        continue
                same(g, want[name], f"-O{opt_level} {dtype} {name}")


def test_constant_operands_fold():
    text = spec("x: 'f32[B, d]'", "y = x + maximum(2, 3) + minimum(0.5, -1.0)")
    from specc.compiler.passes import PassContext, optimize

    graph, _ = optimize(specc.compile(text), PassContext(opt_level=1))
    assert not [n for _, n in graph.nodes() if n.op in ("maximum", "minimum")]
    for level in (0, 1):
        x = torch.randn(3, 4)
        assert torch.equal(specc.load(text, opt_level=level)(x), x + 3 + -1.0)


@pytest.mark.parametrize("nan", ["auto", "portable"])
def test_tvm_llvm_matches_torch(nan, monkeypatch):
    """`auto`: on CPU one reduction kernel whose combiner keeps a nan; `portable`: GPUs' form (Relax's
    reduction beside that of isnan(x)), run here on CPU."""
    pytest.importorskip("tvm")
    from specc.backends.pytorch.weights import init_weights
    from specc.backends.tvm import lowering
    from specc.backends.tvm.build import compile_graph
    from specc.compiler.passes import PassContext, optimize

    monkeypatch.setattr(lowering, "NAN", nan)

    graph, _ = optimize(specc.compile(TEXT), PassContext(opt_level=2))
    weights = init_weights(graph)
    lin = {k[len("lr."):]: v for k, v in weights.items() if k.startswith("lr.")}
    runner = compile_graph(graph, weights=weights)
    for seed, rows in ((0, 3), (1, 5), (2, 1)):
        x, y, w, i, j = operands(seed, max(rows, 3))
        x, y, i, j = x[:rows], y[:rows], i[:rows], j[:rows]
        want = reference(x, y, w, i, j, lin)
        got = runner(x, y, w, i, j)
        for name, g in zip(OUTS.split(), got):
            assert g.dtype == (torch.float32 if want[name].is_floating_point() else want[name].dtype), name
            if name == "lr":
                assert torch.allclose(g.double(), want[name], atol=1e-5, equal_nan=True), name
                continue
            same(g, want[name], f"tvm {name} at B={rows}")


POOLS = spec_text("x: 'f32[B, d]', im: 'f32[B, 2, 2 * H, 6]', s: 'f32[B, 2, 7]'",
                  "a = argmax(x, dim=1)\nb = argmax(x, dim=0, keepdim=true)\nr = argmax(im, dim=-1)\n"
                  "p = max_pool2d(im, 3, stride=2, padding=1)\nq = max_pool1d(s, 2)", "a b r p q",
                  dims="B: 2, d: 4, H: 3")


def pool_operands(rows: int, seed: int = 0):
    """Ties in x (small integers), and nans: two in one row of x (argmax gives the first), one in a window
    of each pool, one at a padded corner."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (rows, 4), generator=g).float()
    x[0, 1], x[0, 3] = NAN, NAN
    im = torch.randn(rows, 2, 6, 6, generator=g)
    im[0, 0, 2, 2], im[0, 1, 0, 0], im[-1, 1, 5, 1] = NAN, NAN, -INF
    s = torch.randn(rows, 2, 7, generator=g)
    s[0, 1, 3] = NAN
    return x, im, s


def pool_reference(x, im, s) -> list[torch.Tensor]:
    x, im, s = x.double(), im.double(), s.double()
    return [x.argmax(dim=1), x.argmax(dim=0, keepdim=True), im.argmax(dim=-1),
            torch.nn.functional.max_pool2d(im, 3, stride=2, padding=1), torch.nn.functional.max_pool1d(s, 2)]


@pytest.mark.parametrize("nan", ["auto", "portable"])
def test_argmax_and_max_pools_keep_nan_on_tvm_llvm(nan, monkeypatch):
    """torch's argmax takes a nan as the largest value (the first one's index), and its max pools give nan for
    a window holding one; so does the TVM backend (Relax's argmax and pools skip a nan), in both forms."""
    pytest.importorskip("tvm")
    from specc.backends.tvm import lowering
    from specc.backends.tvm.build import compile_graph
    from specc.compiler.passes import PassContext, optimize

    monkeypatch.setattr(lowering, "NAN", nan)

    graph, _ = optimize(specc.compile(POOLS), PassContext(opt_level=2))
    runner = compile_graph(graph, weights={})
    model = specc.load(POOLS).double()
    for rows in (1, 3):
        ops = pool_operands(rows)
        want = pool_reference(*ops)
        with torch.no_grad():
            torch_got = model(*(t.double() for t in ops))
        for name, g, t, w in zip("a b r p q".split(), runner(*ops), torch_got, want):
            same(g, w, f"tvm {name} at B={rows}")
            same(t, w, f"torch {name} at B={rows}")
