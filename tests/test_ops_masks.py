"""Comparisons, masks and position embeddings: eq/ne/lt/le/gt/ge (also as `<` etc. in the grammar),
logical and/or/not (also `and`/`or`/`not` on bool tensors), where, masked_fill, tril/triu, ones/zeros,
attention's optional mask, and rotary position embeddings. Small specs are built through specc and
compared in float64 with direct torch calls or hand-written references; shape-rule errors are checked
at their exact line:col with their message; FLOPs against their formula at two sizes.

Tolerances: generated float64 module vs float64 torch/reference: max abs error <= 1e-10 (the same math,
in places a different order of float64 operations); bool and integer results must be equal.
"""

from __future__ import annotations

import functools

import math

import pytest
import torch

import specc
from opcheck import assert_error, close, flops_of, inputs64, load64, spec_text



spec = functools.partial(spec_text, dims="B: 2, T: 5, S: 3")

# ---------------------------------------------------------------------------------------------
# comparisons and logical operators
# ---------------------------------------------------------------------------------------------

def test_comparison_operators_on_tensors_and_numbers():
    text = spec("x: 'f32[B, T, 4]', z: 'f32[T, 4]', n: 'i64[B, T]'",
                "a = x < z\nb = x <= 0.25\nc = 0 > x\nd = x >= z\ne = n == 3\nf = n != 0\ng = lt(x, 0.5)\n"
                "h = ge(-1, x)", outputs="a b c d e f g h")
    model = load64(text)
    x, z, n = inputs64(model)
    x[0, 0, 0] = 0.25  # an equal element for <= and ==
    with torch.no_grad():
        got = model(x, z, n)
    want = (x < z, x <= 0.25, 0 > x, x >= z, n == 3, n != 0, x < 0.5, -1 >= x)
    for g, w in zip(got, want):
        close(g, w)
    s = specc.check(text)
    assert [str(o.type) for o in s.outputs] == ["bool[B, T, 4]"] * 4 + ["bool[B, T]"] * 2 + ["bool[B, T, 4]"] * 2


def test_comparisons_read_as_python_operators(tmp_path):
    text = spec("x: 'f32[B, T]', n: 'i64[B, T]'", "y = cast((x > 0) == (n < 2), f32) + cast(x != x * 2, f32)")
    src = (specc.build(text, tmp_path / "o") / "model.py").read_text()
    assert "((x > 0.0) == (n < 2)).to(self.dtype_ref.dtype) + (x != x * 2.0).to(self.dtype_ref.dtype)" in src


def test_logical_operators_on_bool_tensors():
    text = spec("x: 'f32[B, T]', m: 'bool[T]'",
                "p = x > 0\ny = (p and m) or not (x < -1)\nz = logical_or(logical_not(p), logical_and(m, p))",
                outputs="y z")
    model = load64(text)
    x, m = inputs64(model)
    with torch.no_grad():
        y, z = model(x, m)
    p = x > 0
    close(y, (p & m) | ~(x < -1))
    close(z, ~p | (m & p))


def test_comparison_and_logical_errors():
    assert_error(spec("x: 'f32[B, T, 4]', z: 'f32[B, 5]'", "y = x < z"), 6, 11,
                 "lt: cannot broadcast x f32[B, T, 4] with y f32[B, 5]: dimension -1 is 4 vs 5")
    assert_error(spec("x: 'f32[B, T]', m: 'bool[B, T]'", "y = m == x"), 6, 12,
                 "eq: cannot compare bool[B, T] with f32[B, T]: one is bool and the other is not; cast one of "
                 "them first")
    assert_error(spec("x: 'f32[B, T]', m: 'bool[B, T]'", "y = x and m"), 6, 7,
                 "logical_and: 'x' must be a bool tensor, got f32[B, T]; compare it (e.g. x > 0) or cast(x, bool) "
                 "first")
    assert_error(spec("x: 'f32[B, T]', m: 'bool[B, T]'", "y = m or 1"), 6, 12,
                 "'or' with a tensor on the left needs a tensor on the right, got the integer 1")
    assert_error(spec("x: 'f32[B, T]'", "y = not x"), 6, 11,
                 "logical_not: 'x' must be a bool tensor, got f32[B, T]; compare it (e.g. x > 0) or cast(x, bool) "
                 "first")
    assert_error(spec("m: 'bool[B, T]', k: 'bool[B, S]'", "y = logical_or(m, k)"), 6, 21,
                 "logical_or: cannot broadcast x bool[B, T] with y bool[B, S]: dimension -1 is T vs S")


# ---------------------------------------------------------------------------------------------
# where, masked_fill
# ---------------------------------------------------------------------------------------------

def test_where_with_tensors_and_numbers():
    text = spec("x: 'f32[B, T, 4]', z: 'f32[4]', n: 'i64[B, T]'",
                "keep = reshape(n > 3, B, T, 1)\na = where(keep, x, z)\nb = where(keep, x, 0.0)\n"
                "c = where(x > 0, -1, x)\nd = where(n > 3, n, 7)", outputs="a b c d")
    model = load64(text)
    x, z, n = inputs64(model)
    keep = (n > 3)[..., None]
    with torch.no_grad():
        a, b, c, d = model(x, z, n)
    close(a, torch.where(keep, x, z))
    close(b, torch.where(keep, x, torch.zeros(())))
    close(c, torch.where(x > 0, torch.tensor(-1.0, dtype=x.dtype), x))
    close(d, torch.where(n > 3, n, 7))
    assert [str(o.type) for o in specc.check(text).outputs] == ["f32[B, T, 4]"] * 3 + ["i64[B, T]"]


def test_masked_fill():
    text = spec("x: 'f32[B, T, 4]', n: 'i64[B, T]'",
                "y = masked_fill(x, reshape(n == 0, B, T, 1), -1e9)\nz = masked_fill(n, n > 5, 5)",
                outputs="y z")
    model = load64(text)
    x, n = inputs64(model)
    with torch.no_grad():
        y, z = model(x, n)
    close(y, x.masked_fill((n == 0)[..., None], -1e9))
    close(z, n.masked_fill(n > 5, 5))


def test_where_and_masked_fill_errors():
    assert_error(spec("x: 'f32[B, T]', n: 'i64[B, T]'", "y = where(n, x, 0.0)"), 6, 13,
                 "where: 'cond' must be a bool tensor, got i64[B, T]; compare it (e.g. cond > 0) or "
                 "cast(cond, bool) first")
    assert_error(spec("x: 'f32[B, T]', m: 'bool[B, S]'", "y = where(m, x, 0.0)"), 6, 16,
                 "where: cannot broadcast cond bool[B, S] with x f32[B, T]: dimension -1 is S vs T")
    assert_error(spec("x: 'f32[B, T]', m: 'bool[B, T]', z: 'f32[3]'", "y = where(m, x, z)"), 6, 19,
                 "where: cannot broadcast cond and x f32[B, T] with y f32[3]: dimension -1 is T vs 3")
    assert_error(spec("x: 'f32[T, 4]', m: 'bool[B, T, 1]'", "y = masked_fill(x, m, 0.0)"), 6, 22,
                 "masked_fill: the mask bool[B, T, 1] would enlarge x f32[T, 4] to [B, T, 4] (dimension -3); the "
                 "mask must broadcast to x's shape")
    assert_error(spec("x: 'f32[B, T]', m: 'bool[B, T, 2]'", "y = masked_fill(x, m, 0.0)"), 6, 22,
                 "masked_fill: cannot broadcast x f32[B, T] with mask bool[B, T, 2]: dimension -1 is T vs 2")
    assert_error(spec("x: 'f32[B, T]', m: 'f32[B, T]'", "y = masked_fill(x, m, 0.0)"), 6, 22,
                 "masked_fill: 'mask' must be a bool tensor, got f32[B, T]; compare it (e.g. mask > 0) or "
                 "cast(mask, bool) first")
    assert_error(spec("n: 'i64[B, T]'", "y = masked_fill(n, n > 1, 0.5)"), 6, 29,
                 "masked_fill: x i64[B, T] is an integer tensor but value 0.5 is not an integer")


# ---------------------------------------------------------------------------------------------
# tril, triu, ones, zeros: masks computed in the graph
# ---------------------------------------------------------------------------------------------

def test_masks_built_from_ones_and_triangles_follow_the_symbolic_sizes():
    text = spec("x: 'f32[B, T, 4]'",
                "causal = tril(ones(T, T, dtype=bool))\nband = triu(tril(ones(T, T), 1), -1)\n"
                "z = zeros(B, 1, dtype=i64)\nu = triu(x, diagonal=1)", outputs="causal band z u")
    s = specc.check(text)
    assert [str(o.type) for o in s.outputs] == ["bool[T, T]", "f32[T, T]", "i64[B, 1] in range(1)", "f32[B, T, 4]"]
    model = load64(text)
    for b, t in ((1, 3), (3, 7)):
        (x,) = inputs64(model, B=b, T=t)
        with torch.no_grad():
            causal, band, z, u = model(x)
        close(causal, torch.ones(t, t, dtype=torch.bool).tril())
        close(band, torch.ones(t, t, dtype=torch.float64).tril(1).triu(-1))
        close(z, torch.zeros(b, 1, dtype=torch.int64))
        close(u, x.triu(1))


def test_mask_code_reads_like_torch(tmp_path):
    text = spec("x: 'f32[B, T, 8]'", "causal = tril(ones(T, T, dtype=bool))\n"
                                     "y = masked_fill(x @ transpose(x, 1, 2), not causal, -1e9)")
    src = (specc.build(text, tmp_path / "o") / "model.py").read_text()
    assert "causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)" in src
    assert "y = (x @ x.transpose(1, 2)).masked_fill(~causal, -1e9)  # (B, T, T)" in src


def test_triangle_and_filled_errors():
    assert_error(spec("x: 'f32[T]'", "y = tril(x)"), 6, 12,
                 "tril: expected a tensor of rank >= 2 for 'x', got f32[T]")
    assert_error(spec("x: 'f32[T]'", "y = ones(dtype=f32)"), 6, 7,
                 "ones: give at least one size, e.g. ones(T, T)")
    assert_error(spec("x: 'f32[T]'", "y = zeros(T, -2)"), 6, 13,
                 "zeros: sizes must be positive, got [T, -2]")
    assert_error(spec("x: 'f32[T]'", "y = x + zeros(Q)"), 6, 17, "undefined name 'Q'")


# ---------------------------------------------------------------------------------------------
# attention with a mask
# ---------------------------------------------------------------------------------------------

def reference_attention(x, kv, sd, prefix, heads, causal, full_mask):
    """Softmax attention written out per batch row and head; full_mask: None, or bool/float [B, h, T, S]."""
    def w(name):
        return sd[f"{prefix}.{name}"]

    d = x.shape[-1]
    if f"{prefix}.qkv.weight" in sd:
        q, k, v = (x @ w("qkv.weight").T + w("qkv.bias")).split(d, dim=-1)
    else:
        q = x @ w("q.weight").T + w("q.bias")
        k, v = kv @ w("k.weight").T + w("k.bias"), kv @ w("v.weight").T + w("v.bias")
    b, t, s, dh = x.shape[0], x.shape[1], kv.shape[1], d // heads
    out = torch.zeros(b, t, d, dtype=x.dtype)
    for i in range(b):
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            scores = q[i, :, cols] @ k[i, :, cols].T / math.sqrt(dh)  # [T, S]
            for r in range(t):
                for c in range(s):
                    if causal and c > r:
                        scores[r, c] = float("-inf")
                    elif full_mask is not None and full_mask.dtype == torch.bool and not full_mask[i, h, r, c]:
                        scores[r, c] = float("-inf")
                    elif full_mask is not None and full_mask.dtype != torch.bool:
                        scores[r, c] = scores[r, c] + full_mask[i, h, r, c]
            out[i, :, cols] = torch.softmax(scores, dim=-1) @ v[i, :, cols]
    return out @ w("o.weight").T + w("o.bias")


def bool_mask(*shape, seed=0):
    """A random bool mask whose diagonal (in the last two dimensions) is true: no row is fully masked."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=gen) > 0.5
    eye = torch.eye(shape[-2], shape[-1], dtype=torch.bool)
    return m | eye


MASKS = [  # (declared mask type, how to make it, full [B, h, T, S] mask from it)
    ("bool[B, T, T]", lambda b, t: bool_mask(b, t, t), lambda m, h: m[:, None].expand(-1, h, -1, -1)),
    ("bool[T, T]", lambda b, t: bool_mask(t, t), lambda m, h: m[None, None].expand(2, h, -1, -1)),
    ("bool[B, 1, T]", lambda b, t: bool_mask(b, 1, t) | torch.eye(1, t, dtype=torch.bool),
     lambda m, h: m[:, None].expand(-1, h, 5, -1)),
    ("bool[B, 2, T, T]", lambda b, t: bool_mask(b, 2, t, t), lambda m, h: m),
    ("f64[B, T, T]", lambda b, t: torch.randn(b, t, t, dtype=torch.float64, generator=torch.Generator().manual_seed(3)),
     lambda m, h: m[:, None].expand(-1, h, -1, -1)),
    ("f64[B, 1, 1, T]", lambda b, t: torch.randn(b, 1, 1, t, dtype=torch.float64), lambda m, h: m.expand(-1, h, 5, -1)),
]


@pytest.mark.parametrize("mask_type,make,full", MASKS, ids=[m[0] for m in MASKS])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("opt_level", [0, 1, 2])  # math path, sdpa, sdpa with fused qkv
def test_attention_mask_matches_reference(mask_type, make, full, causal, opt_level):
    dtype = "f64" if mask_type.startswith("f64") else "bool"
    text = spec(f"x: 'f64[B, T, 8]', m: '{mask_type}'",
                f"y = attention(x, heads=2, causal={str(causal).lower()}, mask=m)")
    model = load64(text, opt_level)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=gen)
    m = make(2, 5)
    assert (m.dtype == torch.bool) == (dtype == "bool")
    with torch.no_grad():
        got = model(x, m)
    close(got, reference_attention(x, x, model.state_dict(), "y", 2, causal, full(m, 2)))


@pytest.mark.parametrize("opt_level", [0, 1])
def test_cross_attention_with_a_mask(opt_level):
    text = spec("x: 'f64[B, T, 8]', kv: 'f64[B, S, 6]', m: 'bool[T, S]'", "y = attention(x, 2, kv=kv, mask=m)")
    model = load64(text, opt_level)
    gen = torch.Generator().manual_seed(2)
    x, kv = torch.randn(2, 5, 8, dtype=torch.float64, generator=gen), torch.randn(2, 3, 6, dtype=torch.float64)
    m = bool_mask(5, 3) | torch.tensor([True, False, False])
    with torch.no_grad():
        got = model(x, kv, m)
    close(got, reference_attention(x, kv, model.state_dict(), "y", 2, False, m[None, None].expand(2, 2, -1, -1)))


def test_attention_mask_computed_in_the_graph_and_absent_mask_unchanged(tmp_path):
    text = spec("x: 'f32[B, T, 8]', pad: 'i64[B, T]'",
                "keep = reshape(pad > 0, B, 1, T) and tril(ones(T, T, dtype=bool))\n"
                "a = attention(x, heads=2, mask=keep)\nb = attention(x, heads=2, causal=true)\n"
                "c = attention(x, heads=2, mask=tril(ones(T, T, dtype=bool)))", outputs="a b c")
    model = load64(text, opt_level=0)
    x, pad = inputs64(model, seed=3)
    pad[:, 0] = 1  # the first position is never padding: no row is fully masked
    sd = model.state_dict()
    with torch.no_grad():
        a, b, c = model(x, pad)
    keep = (pad > 0)[:, None, :] & torch.ones(5, 5, dtype=torch.bool).tril()
    close(a, reference_attention(x, x, sd, "a", 2, False, keep[:, None].expand(-1, 2, -1, -1)))
    close(b, reference_attention(x, x, sd, "b", 2, True, None))
    # causal=true and an explicit lower-triangular mask are the same function
    model.c.load_state_dict(model.b.state_dict())
    with torch.no_grad():
        close(model(x, pad)[2], b)
    src = (specc.build(text, tmp_path / "o") / "model.py").read_text()
    assert "a = self.a(x, mask=keep)" in src
    assert "b = self.b(x)  # (B, T, 8)" in src


@pytest.mark.parametrize("mask_type", ["bool", "f64"])
def test_a_query_that_sees_no_key_gets_zeros_at_every_level_and_on_tvm(mask_type):
    """A fully masked row (a padded sequence, say) gives zeros out of the attention (so the layer's output
    is its output projection's bias there) at -O0 (softmax written out), -O1/-O2 (scaled_dot_product_attention)
    and on tvm-llvm alike, and the gradients stay finite; the other rows are as the reference gives them."""
    text = spec(f"x: 'f64[B, T, 8]', m: '{mask_type}[B, 1, T]'", "y = attention(x, heads=2, mask=m)")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=gen)
    keep = torch.ones(2, 1, 5, dtype=torch.bool)
    keep[0] = False  # batch row 0: every key hidden from every query
    keep[1, 0, 3:] = False
    m = keep if mask_type == "bool" else torch.zeros(2, 1, 5, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    base = load64(text, 0)
    sd = base.state_dict()
    want = reference_attention(x[1:], x[1:], sd, "y", 2, False, keep[1:, None].expand(-1, 2, 5, -1))
    for level in (0, 1, 2):
        model = load64(text, level)
        model.load_state_dict(sd, strict=False) if level == 0 else None
        xg = x.clone().requires_grad_(True)
        got = model(xg, m)
        assert torch.equal(got[0], sd["y.o.bias"].expand(5, -1)), (level, got[0])
        close(got[1:], want)
        got.sum().backward()
        assert torch.isfinite(xg.grad).all(), level
    pytest.importorskip("tvm")
    from specc.backends.pytorch.weights import init_weights
    from specc.backends.tvm.build import compile_graph

    graph = specc.compile(text.replace("f64[", "f32["))
    weights = {k: v.float() for k, v in sd.items()}
    assert set(weights) == set(init_weights(graph))
    y = compile_graph(graph, weights=weights)(x.float(), m.float() if mask_type == "f64" else m)
    assert torch.equal(y[0], weights["y.o.bias"].expand(5, -1))  # float32: the CPU row kernel (rowops)
    assert (y[1:].double() - want).abs().max() < 1e-5
    y = compile_graph(specc.compile(text), weights=sd)(x, m)  # float64: the portable Relax form
    assert torch.equal(y[0], sd["y.o.bias"].expand(5, -1))
    assert (y[1:] - want).abs().max() < 1e-12


def test_tvm_masks_at_the_lowest_finite_value_and_bf16():
    """A float mask at the lowest finite value (the Hugging Face convention) hides nothing from a row whose
    every score it sets: the row averages its values, on TVM as in torch (only -inf rows are zeroed); a
    bf16 masked attention builds (its lowest value through ml_dtypes)."""
    pytest.importorskip("tvm")
    from specc.backends.pytorch.weights import init_weights
    from specc.backends.tvm.build import compile_graph

    text = spec("x: 'f32[B, T, 8]', m: 'f32[B, 1, T]'", "y = attention(x, heads=2, mask=m)")
    graph = specc.compile(text)
    weights = init_weights(graph)
    model = load64(text.replace("f32[", "f64["), 0)
    model.load_state_dict({k: v.double() for k, v in weights.items()})
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5))
    m = torch.zeros(2, 1, 5)
    m[0] = torch.finfo(torch.float32).min
    with torch.no_grad():
        want = model(x.double(), m.double())
    got = compile_graph(graph, weights=weights)(x, m)
    assert (got.double() - want).abs().max() < 1e-5
    assert not torch.allclose(want[0], model.y.o.bias.expand(5, -1))  # the row was not zeroed
    bf16 = specc.compile(spec("x: 'bf16[B, T, 8]', m: 'bool[B, 1, T]'", "y = attention(x, heads=2, mask=m)"))
    compile_graph(bf16)


def test_attention_mask_errors():
    assert_error(spec("x: 'f32[B, T, 8]', m: 'bool[B, S, T]'", "y = attention(x, 2, mask=m)"), 6, 23,
                 "attention: the mask bool[B, S, T] does not broadcast to the scores [B, T, T] ([..., T, S]) of x "
                 "f32[B, T, 8]: dimension 1 of the mask is S, where the scores have T")
    assert_error(spec("x: 'f32[B, T, 8]', m: 'bool[B, 3, T, T]'", "y = attention(x, 2, mask=m)"), 6, 23,
                 "attention: the mask bool[B, 3, T, T] does not broadcast to the scores [B, 2, T, T] "
                 "([..., heads, T, S]) of x f32[B, T, 8]: dimension 1 of the mask is 3, where the scores have 2")
    assert_error(spec("x: 'f32[B, T, 8]', m: 'bool[1, B, 1, T, T]'", "y = attention(x, 2, mask=m)"), 6, 23,
                 "attention: the mask bool[1, B, 1, T, T] has rank 5, but the scores of x f32[B, T, 8] have at "
                 "most rank 4 ([..., heads, T, S])")
    assert_error(spec("x: 'f32[B, T, 8]', m: 'i64[T, T]'", "y = attention(x, 2, mask=m)"), 6, 23,
                 "attention: the mask must be bool (true = may attend) or a float mask of x's dtype f32 to add to "
                 "the scores, got an integer mask i64[T, T]")
    assert_error(spec("x: 'f32[B, T, 8]', kv: 'f32[B, S, 8]', m: 'bool[T, T]'", "y = attention(x, 2, kv=kv, mask=m)"),
                 6, 30, "attention: the mask bool[T, T] does not broadcast to the scores [B, T, S] ([..., T, S]) of "
                        "x f32[B, T, 8]: dimension 1 of the mask is T, where the scores have S")


def test_attention_flops_count_the_mask():
    plain = spec("x: 'f32[B, T, 8]'", "y = attention(x, 2)")
    masked = spec("x: 'f32[B, T, 8]', m: 'bool[T, T]'", "y = attention(x, 2, mask=m)")
    for b, t in ((1, 4), (3, 9)):
        assert flops_of(masked, "attention", B=b, T=t) - flops_of(plain, "attention", B=b, T=t) == b * 2 * t * t


def test_tvm_lowers_an_attention_mask():
    """Its outputs against torch's: tests/test_tvm_ops.py."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.lowering import to_relax

    to_relax(specc.compile(spec("x: 'f32[B, T, 8]', m: 'bool[T, T]'", "y = attention(x, 2, mask=m)")))
    to_relax(specc.compile(spec("x: 'f32[B, T, 8]'", "y = attention(x, 2, causal=true)")))


# ---------------------------------------------------------------------------------------------
# rotary position embedding
# ---------------------------------------------------------------------------------------------

def reference_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE through complex numbers: the pair (x[i], x[i + d/2]) is z = x[i] + j x[i + d/2],
    multiplied by exp(j * p * base ** (-2i / d)). positions broadcast against x's (..., T)."""
    d = x.shape[-1]
    z = torch.complex(x[..., : d // 2], x[..., d // 2:])
    theta = positions.to(torch.float64)[..., None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    r = z * torch.polar(torch.ones_like(theta), theta)
    return torch.cat([r.real, r.imag], dim=-1)


def test_rotary_default_positions_and_base():
    text = spec("x: 'f32[B, T, 8]'", "y = rotary(x)\nz = rotary(x, base=100.0)", outputs="y z")
    model = load64(text)
    for t in (1, 6):
        (x,) = inputs64(model, T=t)
        with torch.no_grad():
            y, z = model(x)
        close(y, reference_rotary(x, torch.arange(t)))
        close(z, reference_rotary(x, torch.arange(t), base=100.0))


def test_rotary_with_positions_per_row_on_heads_layout():
    text = spec("q: 'f32[B, 3, T, 4]', pos: 'i64[B, T] in range(100)', p1: 'i64[T] in range(100)'",
                "y = rotary(q, positions=pos)\nz = rotary(q, p1)", outputs="y z")
    model = load64(text)
    q, pos, p1 = inputs64(model)
    with torch.no_grad():
        y, z = model(q, pos, p1)
    close(y, reference_rotary(q, pos[:, None, :]))  # the same positions for every head
    close(z, reference_rotary(q, p1))


def test_rotary_is_a_relative_position_encoding():
    """<rotary(q, m), rotary(k, n)> depends on m - n only: shifting every position changes nothing."""
    text = spec("q: 'f32[B, T, 16]', k: 'f32[B, T, 16]', p: 'i64[B, T] in range(50)'",
                "y = rotary(q, p) @ transpose(rotary(k, p), 1, 2)\n"
                "z = rotary(q, p + 7) @ transpose(rotary(k, p + 7), 1, 2)",
                outputs="y z")
    model = load64(text)
    with torch.no_grad():
        y, z = model(*inputs64(model))
    assert (y - z).abs().max() <= 1e-9


def test_rotary_code_and_helper(tmp_path):
    text = spec("x: 'f32[B, T, 8]', pos: 'i64[B, T]'", "y = rotary(x, positions=pos, base=500.0)")
    src = (specc.build(text, tmp_path / "o") / "model.py").read_text()
    assert "y = apply_rotary(x, positions=pos, base=500.0)  # (B, T, 8)" in src
    assert "def apply_rotary(" in src and "rotate half" in src


def test_rotary_errors_and_flops():
    assert_error(spec("x: 'f32[B, T, 7]'", "y = rotary(x)"), 6, 14,
                 "rotary: the last dimension of x f32[B, T, 7] must be even, got 7")
    assert_error(spec("x: 'f32[B, T, 8]', p: 'i64[S]'", "y = rotary(x, p)"), 6, 17,
                 "rotary: positions i64[S] do not fit x f32[B, T, 8]: dimension 0 of positions is S, dimension 1 "
                 "of x (T) is T")
    assert_error(spec("x: 'f32[B, 2, T, 8]', p: 'i64[T, T]'", "y = rotary(x, positions=p)"), 6, 17,
                 "rotary: positions i64[T, T] do not fit x f32[B, 2, T, 8]: dimension 0 of positions is T, "
                 "dimension 0 of x (B) is B")
    assert_error(spec("x: 'f32[B, T, 8]', p: 'f32[T]'", "y = rotary(x, p)"), 6, 17,
                 "rotary: positions must be an integer tensor, got f32[T]")
    assert_error(spec("x: 'f32[T, 8]', p: 'i64[B, T]'", "y = rotary(x, p)"), 6, 17,
                 "rotary: positions i64[B, T] are per batch row [B, T], but x f32[T, 8] has no batch dimension")
    text = spec("x: 'f32[B, T, 8]'", "y = rotary(x)")
    text_pos = spec("x: 'f32[B, 2, T, 8]', p: 'i64[B, T]'", "y = rotary(x, p)")
    for b, t in ((1, 3), (4, 10)):
        assert flops_of(text, "rotary", B=b, T=t) == 3 * b * t * 8 + 3 * t * 4
        assert flops_of(text_pos, "rotary", B=b, T=t) == 3 * b * 2 * t * 8 + 3 * b * t * 4


# ---------------------------------------------------------------------------------------------
# FLOPs of the elementwise mask operators
# ---------------------------------------------------------------------------------------------

def test_mask_op_flops():
    text = spec("x: 'f32[B, T, 4]', m: 'bool[T, 4]'",
                "a = x < 0.5\nb = where(m, x, 0.0)\nc = masked_fill(x, m, 1.0)\nd = a and m\ne = tril(x)\n"
                "f = ones(T, T)", outputs="a b c d e f")
    for b, t in ((2, 3), (5, 8)):
        n = b * t * 4
        assert [flops_of(text, op, B=b, T=t) for op in ("lt", "where", "masked_fill", "logical_and", "tril", "ones")] \
            == [n, n, n, n, n, 0]
