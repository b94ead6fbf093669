"""Attention's prefix= option and broadcast kv, and attend(q, k, v, heads): softmax attention over the
spec's own projections. Small specs are built through specc and run in float64 against a softmax
attention written out per batch row and head; shape-rule errors are checked at their exact line:col;
FLOPs against their formula.

Tolerances: generated float64 module vs the float64 reference: max abs error <= 1e-10 (the same math,
in places a different order of float64 operations).
"""

from __future__ import annotations

import functools

import math

import pytest
import torch

import specc
from opcheck import assert_error, close, flops_of, load64, spec_text


spec = functools.partial(spec_text, dims="B: 2, T: 5, S: 4", params="{d: 8, l: 3}")

def core(q, k, v, heads, causal=False, keep=None, add=None, pk=None, pv=None):
    """softmax(q k^T / sqrt(dh)) v per batch row and head, written out. q [B, T, d], k/v [B, S, d];
    keep (bool) / add (float): [B, h, T, S] over the S positions; pk/pv [B, l, d]: prefix rows, always seen."""
    b, t, d = q.shape
    s, dh = k.shape[1], d // heads
    l = 0 if pk is None else pk.shape[1]
    out = torch.zeros(b, t, d, dtype=q.dtype)
    for i in range(b):
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            keys, values = k[i, :, cols], v[i, :, cols]
            if l:
                keys, values = torch.cat([pk[i, :, cols], keys]), torch.cat([pv[i, :, cols], values])
            scores = q[i, :, cols] @ keys.T / math.sqrt(dh)  # [T, l + S]
            for r in range(t):
                for c in range(s):
                    if (causal and c > r) or (keep is not None and not keep[i, h, r, c]):
                        scores[r, l + c] = float("-inf")
                    elif add is not None:
                        scores[r, l + c] += add[i, h, r, c]
            out[i, :, cols] = torch.softmax(scores, dim=-1) @ values
    return out


def lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def rand(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# attention(..., prefix=P)
# ---------------------------------------------------------------------------------------------

PREFIXES = [  # (prefix expression, extra input, its [B, 2, l, d] value from the state dict and inputs)
    ("parameter(2, l, d)", "", lambda sd, p: sd["parameter.weight"].expand(2, 2, 3, 8)),
    ("parameter(1, 2, l, d)", "", lambda sd, p: sd["parameter.weight"].expand(2, 2, 3, 8)),
    ("p", ", p: 'f32[B, 2, l, d]'", lambda sd, p: p),
]


@pytest.mark.parametrize("prefix,extra,full", PREFIXES, ids=["shared", "shared-batch-1", "per-row-input"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("opt_level", [0, 1, 2])  # math path, sdpa, sdpa with fused qkv
def test_attention_prefix_matches_reference(prefix, extra, full, causal, opt_level):
    text = spec(f"x: 'f32[B, T, d]'{extra}", f"y = attention(x, heads=2, causal={str(causal).lower()}, prefix={prefix})")
    model = load64(text, opt_level)
    x = rand(2, 5, 8, seed=1)
    args = (x, rand(2, 2, 3, 8, seed=2)) if extra else (x,)
    sd = specc.load(text, opt_level=0).double().state_dict()  # the unfused weights
    with torch.no_grad():
        got = model(*args)
    p = full(sd, args[-1])
    q, k, v = lin(x, sd, "y.q"), lin(x, sd, "y.k"), lin(x, sd, "y.v")
    close(got, lin(core(q, k, v, 2, causal, pk=p[:, 0], pv=p[:, 1]), sd, "y.o"))


@pytest.mark.parametrize("opt_level", [0, 1])
def test_attention_prefix_with_causal_and_mask(opt_level):
    text = spec("x: 'f32[B, T, d]', m: 'bool[B, 1, T]', a: 'f32[T, T]'",
                "y = attention(x, 2, causal=true, mask=m, prefix=parameter(2, l, d))\n"
                "z = attention(x, 2, mask=a, prefix=parameter(2, l, d))", outputs="y z")
    model = load64(text, opt_level)
    sd = specc.load(text, opt_level=0).double().state_dict()
    x = rand(2, 5, 8, seed=3)
    m = rand(2, 1, 5, seed=4) > 0
    m[:, :, 0] = True  # a causal row 0 sees position 0
    a = rand(5, 5, seed=5)
    with torch.no_grad():
        y, z = model(x, m, a)
    p, pz = sd["parameter.weight"], sd["parameter_1.weight"]
    b2 = lambda t: t.expand(2, *t.shape)  # noqa: E731
    want_y = core(lin(x, sd, "y.q"), lin(x, sd, "y.k"), lin(x, sd, "y.v"), 2, True,
                  keep=m[:, None].expand(2, 2, 5, 5), pk=b2(p[0]), pv=b2(p[1]))
    want_z = core(lin(x, sd, "z.q"), lin(x, sd, "z.k"), lin(x, sd, "z.v"), 2,
                  add=a.expand(2, 2, 5, 5), pk=b2(pz[0]), pv=b2(pz[1]))
    close(y, lin(want_y, sd, "y.o"))
    close(z, lin(want_z, sd, "z.o"))


def test_cross_attention_with_kv_shared_by_every_batch_row():
    text = spec("x: 'f32[B, T, d]', c: 'f32[S, 6]'", "y = attention(x, 2, kv=c)")
    model = load64(text)
    sd = model.state_dict()
    x, c = rand(2, 5, 8, seed=6), rand(4, 6, seed=7)
    with torch.no_grad():
        got = model(x, c)
    ce = c.expand(2, 4, 6)
    close(got, lin(core(lin(x, sd, "y.q"), lin(ce, sd, "y.k"), lin(ce, sd, "y.v"), 2), sd, "y.o"))


def test_prefix_code_reads_like_torch(tmp_path):
    text = spec("x: 'f32[B, T, d]'", "p = parameter(2, l, d, init=normal(0.02))\n"
                                     "y = attention(x, 2, causal=true, prefix=p)")
    src = (specc.build(text, tmp_path / "o") / "model.py").read_text()
    assert "self.p = Parameters(weight=(2, 3, 8))" in src
    assert "p = self.p.weight  # (2, 3, 8)\n        y = self.y(x, prefix=p)  # (B, T, 8)" in src


# ---------------------------------------------------------------------------------------------
# attend(q, k, v, heads)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_level", [0, 2])
def test_attend_over_the_specs_own_projections(opt_level):
    text = spec("x: 'f32[B, T, d]', m: 'f32[B, 4, T, T]'",
                "q = linear(x, d)\n"
                "k = linear(x, d)\n"
                "y = attend(q, k, linear(x, d), heads=2, causal=true)\n"
                "z = attend(q, k, k, 4, mask=m, prefix=parameter(1, 2, l, d))", outputs="y z")
    model = load64(text, opt_level)
    sd = specc.load(text, opt_level=0).double().state_dict()
    x, m = rand(2, 5, 8, seed=8), rand(2, 4, 5, 5, seed=9)
    with torch.no_grad():
        y, z = model(x, m)
    q, k, v = lin(x, sd, "q"), lin(x, sd, "k"), lin(x, sd, "linear")
    p = sd["parameter.weight"].expand(2, 2, 3, 8)
    close(y, core(q, k, v, 2, causal=True))
    close(z, core(q, k, k, 4, add=m, pk=p[:, 0], pv=p[:, 1]))


def test_attend_with_keys_shared_by_every_batch_row(tmp_path):
    text = spec("x: 'f32[B, T, d]', c: 'f32[S, d]'", "y = attend(x, c, c * 2, heads=2)")
    model = load64(text)
    x, c = rand(2, 5, 8, seed=10), rand(4, 8, seed=11)
    with torch.no_grad():
        got = model(x, c)
    close(got, core(x, c.expand(2, 4, 8), 2 * c.expand(2, 4, 8), 2))
    src = (specc.build(text.replace("f64", "f32"), tmp_path / "o") / "model.py").read_text()
    assert "y = MultiHeadAttention.attend(x, c, c * 2.0, heads=2)  # (B, T, 8)" in src


def test_attend_is_computed_once_for_equal_calls_and_counted():
    text = spec("x: 'f32[B, T, d]'", "y = attend(x, x, x, 2) + attend(x, x, x, 2)")
    from specc.compiler.passes import PassContext, optimize
    from specc.compiler.printer import print_graph

    graph, _ = optimize(specc.compile(text), PassContext(opt_level=1))
    assert print_graph(graph, show_span=False).count("= attend(") == 1
    one = spec("x: 'f32[B, T, d]'", "y = attend(x, x, x, 2, prefix=parameter(2, l, d))")
    for b, t in ((1, 4), (3, 9)):
        s = t + 3  # T keys and l = 3 prefix rows
        assert flops_of(one, "attend", B=b, T=t) == 2 * b * t * s * 8 * 2 + 5 * b * 2 * t * s
    plain = spec("x: 'f32[B, T, d]'", "y = attention(x, 2)")
    prefixed = spec("x: 'f32[B, T, d]'", "y = attention(x, 2, prefix=parameter(2, l, d))")
    for b, t in ((1, 4), (3, 9)):
        extra = flops_of(prefixed, "attention", B=b, T=t) - flops_of(plain, "attention", B=b, T=t)
        assert extra == 2 * b * t * 3 * 8 * 2 + 5 * b * 2 * t * 3


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_prefix_and_attend_errors():
    assert_error(spec("x: 'f32[B, T, d]'", "y = attention(x, 2, prefix=parameter(l, 2, d))"), 7, 23,
                 "attention: the prefix must be [..., 2, l, 8] (l key rows, then l value rows, of x's width), "
                 "got f32[3, 2, 8]")
    assert_error(spec("x: 'f32[B, T, d]', p: 'f32[T, 2, l, d]'", "y = attention(x, 2, prefix=p)"), 7, 23,
                 "attention: the batch dimensions [T] of the prefix f32[T, 2, 3, 8] do not broadcast to those of x "
                 "f32[B, T, 8], [B]")
    assert_error(spec("x: 'f32[B, T, d]', c: 'f32[T, S, d]'", "y = attention(x, 2, kv=c)"), 7, 23,
                 "attention: the batch dimensions [T] of kv f32[T, S, 8] do not broadcast to those of x "
                 "f32[B, T, 8], [B]")
    assert_error(spec("x: 'f32[B, T, d]', k: 'f32[B, S, 4]'", "y = attend(x, k, k, 2)"), 7, 17,
                 "attend: keys k f32[B, S, 4] must have the dtype and width of the queries q f32[B, T, 8]")
    assert_error(spec("x: 'f32[B, T, d]', k: 'f32[B, S, d]'", "y = attend(x, k, x, 2)"), 7, 20,
                 "attend: values v f32[B, T, 8] must have the shape and dtype of the keys k f32[B, S, 8]")
    assert_error(spec("x: 'f32[B, T, d]', k: 'f32[B, S, d]'", "y = attend(x, k, k, 2, causal=true)"), 7, 26,
                 "attend: causal attention needs as many keys as queries, got k f32[B, S, 8] for q f32[B, T, 8]")
    assert_error(spec("x: 'f32[B, T, d]'", "y = attend(x, x, x, 3)"), 7, 23,
                 "attend: the width 8 is not divisible by heads=3")
    assert_error(spec("x: 'f32[B, T, d]', m: 'bool[T, S]'", "y = attend(x, x, x, 2, mask=m)"), 7, 26,
                 "attend: the mask bool[T, S] does not broadcast to the scores [B, T, T] ([..., T, S]) of q "
                 "f32[B, T, 8]: dimension 1 of the mask is S, where the scores have T")


def test_tvm_lowers_prefix_attend_and_broadcast_keys():
    """The TVM backend lowers them (its outputs against torch's: tests/test_tvm_ops.py)."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.lowering import LOWERINGS, UNSUPPORTED, to_relax

    assert "attend" in LOWERINGS and "attend" not in UNSUPPORTED
    to_relax(specc.compile(spec("x: 'f32[B, T, d]'", "y = attention(x, 2, prefix=parameter(2, l, d))")))
    to_relax(specc.compile(spec("x: 'f32[B, T, d]', c: 'f32[S, d]'", "y = attention(x, 2, kv=c)")))


# ---------------------------------------------------------------------------------------------
# attention(..., head_dim=k): heads of a width other than d / heads (structured pruning)
# ---------------------------------------------------------------------------------------------

def core_dh(q, k, v, heads, dh, causal=False):
    """softmax(q k^T / sqrt(dh)) v per batch row and head over heads * dh columns, written out."""
    b, t, _ = q.shape
    out = torch.zeros(b, t, heads * dh, dtype=q.dtype)
    for i in range(b):
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            scores = q[i, :, cols] @ k[i, :, cols].T / math.sqrt(dh)
            if causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            out[i, :, cols] = torch.softmax(scores, dim=-1) @ v[i, :, cols]
    return out


@pytest.mark.parametrize("opt_level", [0, 1, 2])  # math path, sdpa, sdpa with fused qkv
@pytest.mark.parametrize("heads,dh", [(3, 2), (2, 4), (5, 3)])  # 3 * 2 < d, 2 * 4 = d, 5 * 3 > d
def test_attention_head_dim_matches_reference(opt_level, heads, dh):
    text = spec("x: 'f32[B, T, d]'", f"y = attention(x, heads={heads}, head_dim={dh}, causal=true)")
    sd = specc.load(text, opt_level=0).double().state_dict()
    inner = heads * dh
    assert sd["y.q.weight"].shape == (inner, 8) and sd["y.k.bias"].shape == (inner,)
    assert sd["y.o.weight"].shape == (8, inner) and sd["y.o.bias"].shape == (8,)
    model = load64(text, opt_level)
    x = rand(2, 5, 8, seed=12)
    with torch.no_grad():
        got = model(x)
    want = lin(core_dh(lin(x, sd, "y.q"), lin(x, sd, "y.k"), lin(x, sd, "y.v"), heads, dh, causal=True), sd, "y.o")
    close(got, want)


def test_attention_head_dim_default_is_the_old_layer_and_flops_follow_the_width():
    plain = spec("x: 'f32[B, T, d]'", "y = attention(x, 2)")
    same = spec("x: 'f32[B, T, d]'", "y = attention(x, 2, head_dim=4)")
    a, b = specc.load(plain, opt_level=0).state_dict(), specc.load(same, opt_level=0).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same shapes, same seeded values
    narrow = spec("x: 'f32[B, T, d]', c: 'f32[B, S, 6]'", "y = attention(x, 3, head_dim=2, kv=c)")
    for bb, t in ((1, 5), (3, 7)):
        s, inner = 4, 6
        assert flops_of(same, "attention", B=bb, T=t) == flops_of(plain, "attention", B=bb, T=t)
        proj = 2 * bb * t * 8 * inner * 2 + 2 * bb * s * 6 * inner * 2
        assert flops_of(narrow, "attention", B=bb, T=t) == proj + 2 * bb * t * s * inner * 2 + 5 * bb * 3 * t * s
    model = load64(narrow)
    sd = model.state_dict()
    x, c = rand(2, 5, 8, seed=13), rand(2, 4, 6, seed=14)
    with torch.no_grad():
        got = model(x, c)
    close(got, lin(core_dh(lin(x, sd, "y.q"), lin(c, sd, "y.k"), lin(c, sd, "y.v"), 3, 2), sd, "y.o"))


def test_attention_head_dim_prefix_rows_have_the_inner_width():
    text = spec("x: 'f32[B, T, d]'", "y = attention(x, 3, head_dim=2, prefix=parameter(2, l, 6))")
    assert specc.check(text).params > 0
    assert_error(spec("x: 'f32[B, T, d]'", "y = attention(x, 3, head_dim=2, prefix=parameter(2, l, d))"), 7, 35,
                 "attention: the prefix must be [..., 2, l, 6] (l key rows, then l value rows, of width heads * "
                 "head_dim), got f32[2, 3, 8]")
    assert_error(spec("x: 'f32[B, T, d]'", "y = attention(x, 3, head_dim=0)"), 7, 23,
                 "attention: head_dim must be positive, got 0")
    assert_error(spec("x: 'f32[B, T, d]'", "y = attention(x, 3)"), 7, 20,
                 "attention: the width 8 is not divisible by heads=3")


def test_tvm_lowers_attention_with_head_dim():
    """tvm-llvm against the float64 torch model: the kernel path (no mask), the fused-qkv path (-O2),
    and the written-out path (a mask, a prefix)."""
    pytest.importorskip("tvm")
    from specc.backends.pytorch.build import artifacts, load_in_memory
    from specc.backends.pytorch.weights import init_weights, materialise
    from specc.backends.tvm.build import compile_graph
    from specc.compiler.passes import PassContext, optimize

    text = spec("x: 'f32[B, T, d]', m: 'bool[B, T, T]'",
                "y = attention(x, 3, head_dim=2, causal=true)\n"
                "z = attention(x, 5, head_dim=3, mask=m, prefix=parameter(2, l, 15))", outputs="y z")
    graph = specc.compile(text)
    weights = init_weights(graph)
    model = load_in_memory(artifacts(graph, text, "m.yaml", weights=weights, ctx=PassContext(opt_level=0))).double()
    x, m = rand(2, 5, 8, seed=15).float(), rand(2, 5, 5, seed=16) > -0.5
    m[..., 0] = True
    with torch.no_grad():
        want = model(x.double(), m)
    for level in (0, 2):
        opt, _ = optimize(graph, PassContext(opt_level=level))
        got = compile_graph(opt, weights=materialise(opt, weights))(x, m)
        for g, w in zip(got, want):
            assert (g.double() - w).abs().max().item() <= 1e-4 * max(1.0, w.abs().max().item())
