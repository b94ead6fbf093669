"""Grouped-query attention in the functional op: attend(q, k, v, heads, kv_heads=K). Small specs are
built through specc and run in float64 against attention written out with torch ops (the key/value
heads repeated with repeat_interleave for their groups of query heads, an explicit softmax), at -O0 and
-O2, for kv_heads 1, 2 and heads, with causal, a bool mask, a per-head additive float mask, a prefix,
and keys shared by every batch row; the generated code; equal calls computed once; FLOPs; located
errors; TVM (llvm run against torch, CUDA source).

Tolerances: generated float64 module vs the float64 reference: max abs error <= 1e-12 (the same math,
in places a different order of float64 operations, at widths of 16). tvm-llvm (float32) vs the generated
torch module run in float64: max abs error <= 1e-4 * max(1, max |reference|) (tests/test_tvm_ops.py's TOL).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import specc
from opcheck import assert_error, close, flops_of, spec_text

TOL = 1e-12
HEADS, D, DH = 4, 16, 4  # q of 4 heads of width 4

spec = functools.partial(spec_text, dims="B: 2, T: 5, S: 3", params="{l: 2}")


def rand(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def reference(q, k, v, heads, kv_heads, causal=False, keep=None, add=None, pk=None, pv=None):
    """softmax(q k^T / sqrt(dh)) v per query head h, which reads key/value head h // (heads / kv_heads).
    q [B, T, heads * dh]; k, v [..., S, kv_heads * dh] (batch dimensions broadcast to q's); keep (bool,
    true = may attend) / add (float, added): [B, T, S] or [B, heads, T, S]; pk, pv [B, l, kv_heads * dh]:
    prefix rows before k and v, seen by every query (causal, keep and add apply to the S keys)."""
    b, t, w = q.shape
    dh, g = w // heads, heads // kv_heads
    k, v = k.expand(b, *k.shape[-2:]), v.expand(b, *v.shape[-2:])
    l = 0 if pk is None else pk.shape[1]
    if pk is not None:
        k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
    s = k.shape[1] - l

    def heads_of(x, n):  # [B, n, len, dh]
        return x.reshape(b, x.shape[1], n, dh).transpose(1, 2)

    qh = heads_of(q, heads)
    kh = heads_of(k, kv_heads).repeat_interleave(g, dim=1)  # [B, heads, l + S, dh]
    vh = heads_of(v, kv_heads).repeat_interleave(g, dim=1)
    scores = qh @ kh.transpose(-2, -1) / math.sqrt(dh)  # [B, heads, T, l + S]
    hide = torch.zeros(b, heads, t, s, dtype=torch.bool)
    if causal:
        hide |= torch.ones(t, s, dtype=torch.bool).triu(1)
    if keep is not None:
        hide |= ~(keep[:, None] if keep.dim() == 3 else keep)
    if add is not None:
        scores[..., l:] += add[:, None] if add.dim() == 3 else add
    scores[..., l:] = scores[..., l:].masked_fill(hide, float("-inf"))
    e = (scores - scores.amax(-1, keepdim=True)).exp()
    y = (e / e.sum(-1, keepdim=True)) @ vh  # [B, heads, T, dh]
    return y.transpose(1, 2).reshape(b, t, w)


def gqa_spec(kv_heads):
    kw = DH * kv_heads
    return spec(f"x: 'f32[B, T, {D}]', c: 'f32[S, {kw}]', m: 'bool[B, T, T]', f: 'f32[B, {HEADS}, T, T]', "
                f"p: 'f32[B, 2, l, {kw}]'",
                f"q = linear(x, {D})\n"
                f"k = linear(x, {kw})\n"
                f"v = linear(x, {kw})\n"
                f"a = attend(q, k, v, heads={HEADS}, kv_heads={kv_heads}, causal=true)\n"
                f"b = attend(q, k, v, heads={HEADS}, kv_heads={kv_heads}, mask=m)\n"
                f"e = attend(q, k, v, {HEADS}, kv_heads={kv_heads}, mask=f, prefix=p)\n"
                f"g = attend(q, c, c * 2, heads={HEADS}, kv_heads={kv_heads})\n"
                f"h = attend(q, k, v, heads={HEADS}, kv_heads={kv_heads}, causal=true, mask=m, prefix=p)",
                outputs="a b e g h")


def inputs(kv_heads):
    kw = DH * kv_heads
    x, c = rand(2, 5, D, seed=1), rand(3, kw, seed=2)
    m = rand(2, 5, 5, seed=3) > 0
    m[..., 0] = True  # every query sees a key
    f = 0.5 * rand(2, HEADS, 5, 5, seed=4)
    f[..., 1:] = f[..., 1:].masked_fill(rand(2, HEADS, 5, 4, seed=5) > 0.8, float("-inf"))  # hidden keys
    p = rand(2, 2, 2, kw, seed=6)
    return x, c, m, f, p


# ---------------------------------------------------------------------------------------------
# against the written-out reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("kv_heads", [1, 2, HEADS])
def test_attend_gqa_matches_the_written_out_reference(kv_heads, opt_level):
    text = gqa_spec(kv_heads)
    model = specc.load(text, opt_level=opt_level).double().eval()
    sd = specc.load(text, opt_level=0).double().state_dict()  # the unfused weights (the same values)
    x, c, m, f, p = inputs(kv_heads)
    with torch.no_grad():
        got = model(x, c, m, f, p)
    q, k, v = lin(x, sd, "q"), lin(x, sd, "k"), lin(x, sd, "v")
    ref = functools.partial(reference, heads=HEADS, kv_heads=kv_heads)
    wants = (ref(q, k, v, causal=True), ref(q, k, v, keep=m), ref(q, k, v, add=f, pk=p[:, 0], pv=p[:, 1]),
             ref(q, c, 2 * c), ref(q, k, v, causal=True, keep=m, pk=p[:, 0], pv=p[:, 1]))
    assert len(got) == len(wants)
    for g, w in zip(got, wants):
        close(g, w, TOL)


def test_generated_code_and_ir(tmp_path):
    """kv_heads < heads reads MultiHeadAttentionGQA.attend(..., kv_heads=K); without kv_heads (or with
    kv_heads = heads) the IR and code are those of plain attend, with the same outputs."""
    from specc.compiler.printer import print_graph

    def one(width, extra=""):
        return spec(f"x: 'f32[B, T, {D}]', kv: 'f32[B, T, {width}]'", f"y = attend(x, kv, kv, 4{extra}, causal=true)")

    plain, same, gqa = one(D), one(D, ", kv_heads=4"), one(8, ", kv_heads=2")
    assert "kv_heads" not in print_graph(specc.compile(plain))
    assert "kv_heads=2)" in print_graph(specc.compile(gqa))
    code = {name: (specc.build(text, tmp_path / name) / "model.py").read_text()
            for name, text in (("plain", plain), ("same", same), ("gqa", gqa))}
    line = "y = MultiHeadAttention.attend(x, kv, kv, heads=4, causal=True)  # (B, T, 16)"
    assert line in code["plain"] and line in code["same"]
    assert "GQA" not in code["plain"] + code["same"] and "kv_heads" not in code["plain"] + code["same"]
    assert "y = MultiHeadAttentionGQA.attend(x, kv, kv, heads=4, kv_heads=2, causal=True)  # (B, T, 16)" in code["gqa"]
    assert code["gqa"].index("class MultiHeadAttention(") < code["gqa"].index("class MultiHeadAttentionGQA(")
    x = rand(2, 5, D, seed=7)
    with torch.no_grad():
        close(specc.load(same).double()(x, x), specc.load(plain).double()(x, x), 0.0)


def test_equal_calls_are_computed_once_and_flops_are_those_of_the_query_heads():
    from specc.compiler.passes import PassContext, optimize
    from specc.compiler.printer import print_graph

    text = spec(f"x: 'f32[B, T, {D}]', k: 'f32[B, S, 8]'",
                "y = attend(x, k, k, 4, kv_heads=2) + attend(x, k, k, 4, kv_heads=2)")
    graph, _ = optimize(specc.compile(text), PassContext(opt_level=1))
    assert print_graph(graph, show_span=False).count("= attend(") == 1
    mha = spec(f"x: 'f32[B, T, {D}]', k: 'f32[B, S, {D}]', m: 'bool[B, T, S]'",
               "y = attend(x, k, k, 4, mask=m, prefix=parameter(2, l, 16))")
    for kv_heads in (1, 2):
        gqa = spec(f"x: 'f32[B, T, {D}]', k: 'f32[B, S, {4 * kv_heads}]', m: 'bool[B, T, S]'",
                   f"y = attend(x, k, k, 4, kv_heads={kv_heads}, mask=m, prefix=parameter(2, l, {4 * kv_heads}))")
        for b, t, s in ((1, 4, 3), (3, 9, 5)):
            keys = s + 2  # S keys and l = 2 prefix rows
            want = 2 * b * t * keys * D * 2 + 5 * b * HEADS * t * keys + b * HEADS * t * keys
            assert flops_of(gqa, "attend", B=b, T=t, S=s) == flops_of(mha, "attend", B=b, T=t, S=s) == want


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("graph,col,message", [
    ("y = attend(x, k, k, 4, kv_heads=3)", 26,
     "attend: kv_heads=3 must be positive and divide heads=4 (each group of heads / kv_heads query heads "
     "shares one key/value head)"),
    ("y = attend(x, k, k, heads=4, causal=true, kv_heads=0)", 45,
     "attend: kv_heads=0 must be positive and divide heads=4 (each group of heads / kv_heads query heads "
     "shares one key/value head)"),
    ("y = attend(x, x, x, 4, kv_heads=2)", 17,
     "attend: keys k f32[B, T, 16] must have the width kv_heads * head_dim = 2 * 4 = 8 (head_dim = 16 / "
     "heads=4, from the queries q f32[B, T, 16]), got 16"),
    ("y = attend(x, k, k, 4, kv_heads=1)", 17,
     "attend: keys k f32[B, S, 8] must have the width kv_heads * head_dim = 1 * 4 = 4 (head_dim = 16 / "
     "heads=4, from the queries q f32[B, T, 16]), got 8"),
    ("y = attend(x, k, x, 4, kv_heads=2)", 20,
     "attend: values v f32[B, T, 16] must have the shape and dtype of the keys k f32[B, S, 8]"),
    ("y = attend(x, k, k, 4, kv_heads=4)", 17,  # kv_heads = heads: attend's own message
     "attend: keys k f32[B, S, 8] must have the dtype and width of the queries q f32[B, T, 16]"),
    ("y = attend(x, k, k, 4, kv_heads=2, prefix=p)", 38,
     "attend: the prefix must be [..., 2, l, 8] (l key rows, then l value rows, of width kv_heads * head_dim), "
     "got f32[B, 2, 2, 16]"),
    ("y = attend(x, x, x, 4, kv_heads=4, prefix=k)", 38,
     "attend: the prefix must be [..., 2, l, 16] (l key rows, then l value rows, of q's width), "
     "got f32[B, S, 8]"),
])
def test_errors_are_located(graph, col, message):
    text = spec(f"x: 'f32[B, T, {D}]', k: 'f32[B, S, 8]', p: 'f32[B, 2, l, {D}]'", graph)
    assert_error(text, 7, col, message)


# ---------------------------------------------------------------------------------------------
# TVM
# ---------------------------------------------------------------------------------------------

TVM_SPEC = """\
specc: 1
name: attend_gqa
dims:
  B: 2
  T: {example: 5, max: 16}
  S: 3
inputs:
  x: f32[B, T, 16]
  m: bool[B, T, T]
  f: f32[B, 4, T, T]
  c: f32[S, 4]
graph: |
  q = linear(x, 16)
  k = linear(x, 8)
  v = linear(x, 8)
  a = attend(q, k, v, heads=4, kv_heads=2, causal=true)
  b = attend(q, k, v, heads=4, kv_heads=2, mask=m or tril(triu(ones(T, T, dtype=bool))), prefix=parameter(2, 3, 8))
  e = attend(q, k, v, heads=4, kv_heads=2, causal=true, mask=f * 0.5)
  g = attend(q, c, c * 2.0, heads=4, kv_heads=1)
outputs:
  a:
  b:
  e:
  g:
"""


def test_tvm_llvm_matches_torch():
    """One library at two lengths: the fused CPU kernel over repeated k/v (a, and g over keys shared by
    the batch), the written-out core with a bool mask and a repeated prefix (b) and a per-head float
    mask (e)."""
    pytest.importorskip("tvm")
    from test_tvm_ops import check

    check(TVM_SPEC, [dict(B=1, T=5), dict(B=3, T=9)], "attend_gqa")


def test_tvm_cuda_codegen():
    """The CUDA path without a GPU (as tests/test_tvm_cuda.py): every kernel scheduled, CUDA C generated."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import device_source

    src = device_source(specc.compile(TVM_SPEC), {"kind": "cuda", "arch": "sm_90"})
    assert "__global__" in src and "threadIdx.x" in src
