"""Grouped-query attention: attention(x, heads, kv_heads=...). Small specs are built through specc and
run in float64 against attention written out per batch row and head, the key/value heads repeated
(repeat_interleave) for their groups of query heads, at -O0 (math path), -O1 (sdpa) and -O2 (sdpa over
one fused q/k/v projection of (heads + 2 * kv_heads) * head_dim rows); options composed with it
(causal, bool and per-head masks, rope, head_dim, prefix, cross-attention kv, dropout); located errors;
parameter shapes; FLOPs; pruning's refusal; training prefixes; TVM (llvm run, CUDA source).

Tolerances: generated float64 module vs the float64 reference: max abs error <= 1e-12 (the same math,
in places a different order of float64 operations, at widths of 16). tvm-llvm (float32) vs the generated
torch module run in float64: max abs error <= 1e-4 * max(1, max |reference|) (tests/test_tvm_ops.py's TOL);
tvm-llvm float64 vs the same: 1e-12.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import specc
from specc.compiler.passes import PassContext, optimize
from opcheck import assert_error, close, flops_of, spec_text

TOL = 1e-12
HEADS, D = 4, 16  # head width 4

spec = functools.partial(spec_text, dims="B: 2, T: 5, S: 3", params="{d: 16, l: 2}")


def rand(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def turn(x, base, r):
    """Rotary embedding ("rotate half") of the first r channels of each head of x [B, T, n, dh]."""
    t = x.shape[1]
    inv = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv  # [T, r/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    a, b, rest = x[..., : r // 2], x[..., r // 2: r], x[..., r:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def reference(q, k, v, heads, kv_heads, causal=False, keep=None, rope=None, rope_dim=None, pk=None, pv=None):
    """softmax(q k^T / sqrt(dh)) v per batch row and query head h, which reads key/value head
    h // (heads / kv_heads). q [B, T, heads * dh]; k, v [B, S, kv_heads * dh]; keep bool [B, heads, T, S];
    rope: the rotary base (q and k turned on their own heads); pk, pv [B, l, kv_heads * dh] prefix rows."""
    b, t, w = q.shape
    s, dh = k.shape[1], w // heads
    q = q.reshape(b, t, heads, dh)
    k = k.reshape(b, s, kv_heads, dh)
    v = v.reshape(b, s, kv_heads, dh)
    if rope is not None:
        q, k = turn(q, rope, rope_dim or dh), turn(k, rope, rope_dim or dh)
    g = heads // kv_heads
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)  # [B, S, heads, dh]
    l = 0
    if pk is not None:
        l = pk.shape[1]
        k = torch.cat([pk.reshape(b, l, kv_heads, dh).repeat_interleave(g, dim=2), k], dim=1)
        v = torch.cat([pv.reshape(b, l, kv_heads, dh).repeat_interleave(g, dim=2), v], dim=1)
    out = torch.zeros(b, t, heads, dh, dtype=q.dtype)
    for i in range(b):
        for h in range(heads):
            scores = q[i, :, h] @ k[i, :, h].T / math.sqrt(dh)  # [T, l + S]
            for r in range(t):
                for c in range(s):
                    if (causal and c > r) or (keep is not None and not keep[i, h, r, c]):
                        scores[r, l + c] = float("-inf")
            out[i, :, h] = torch.softmax(scores, dim=-1) @ v[i, :, h]
    return out.reshape(b, t, w)


def built(text, opt_level):
    model = specc.load(text, opt_level=opt_level).double().eval()
    sd = specc.load(text, opt_level=0).double().state_dict()  # the unfused weights (the same values)
    return model, sd


def run(model, *args):
    with torch.no_grad():
        return model(*args)


# ---------------------------------------------------------------------------------------------
# against the written-out reference
# ---------------------------------------------------------------------------------------------

CASES = {  # name: (extra inputs, extra attention arguments, reference keywords from (inputs) -> dict)
    "plain": ("", "", lambda a: {}),
    "causal": ("", ", causal=true", lambda a: {"causal": True}),
    "bool-mask": (", m: 'bool[B, T, T]'", ", mask=m", lambda a: {"keep": a[1][:, None].expand(2, HEADS, 5, 5)}),
    "rope-causal": ("", ", rope=10000, causal=true", lambda a: {"rope": 10000.0, "causal": True}),
}


def _inputs(extra):
    x = rand(2, 5, D, seed=1)
    if "m:" in extra:
        m = rand(2, 5, 5, seed=2) > 0
        m[..., 0] = True
        return x, m
    return (x,)


@pytest.mark.parametrize("opt_level", [0, 1, 2])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kv_heads", [1, 2, HEADS])
def test_gqa_matches_the_written_out_reference(kv_heads, case, opt_level):
    extra, more, ref = CASES[case]
    text = spec(f"x: 'f32[B, T, d]'{extra}", f"y = attention(x, heads={HEADS}, kv_heads={kv_heads}{more})")
    model, sd = built(text, opt_level)
    args = _inputs(extra)
    x = args[0]
    want = reference(lin(x, sd, "y.q"), lin(x, sd, "y.k"), lin(x, sd, "y.v"), HEADS, kv_heads, **ref(args))
    want = lin(want, sd, "y.o")
    close(run(model, *args), want, TOL)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_opt_levels_fuse_and_use_sdpa_and_agree(kv_heads):
    """-O1 picks the sdpa kernel, -O2 also fuses q/k/v into one [(heads + 2 kv_heads) dh, d] projection
    (q rows, then k, then v); the three levels compute the same outputs."""
    text = spec("x: 'f32[B, T, d]', m: 'bool[B, T, T]'",
                f"y = attention(x, heads={HEADS}, kv_heads={kv_heads}, causal=true, mask=m, rope=100)")
    dh = D // HEADS
    for level, impl, fused in ((0, "math", False), (1, "sdpa", False), (2, "sdpa", True)):
        graph, _ = optimize(specc.compile(text), PassContext(opt_level=level))
        (node,) = [n for _, n in graph.nodes() if n.op == "attention"]
        assert (node.attr("impl"), node.attr("qkv"), node.attr("kv_heads")) == (impl, fused, kv_heads)
        shapes = {p.name: p.shape for p in node.params}
        if fused:
            assert shapes["qkv.weight"] == ((HEADS + 2 * kv_heads) * dh, D)
            assert shapes["qkv.bias"] == ((HEADS + 2 * kv_heads) * dh,)
    args = _inputs(", m:")
    outs = [run(built(text, level)[0], *args) for level in (0, 1, 2)]
    sd = built(text, 0)[1]
    fused = specc.load(text, opt_level=2).double().state_dict()
    cat = torch.cat([sd["y.q.weight"], sd["y.k.weight"], sd["y.v.weight"]])
    assert torch.equal(fused["y.qkv.weight"], cat)
    close(outs[1], outs[0], TOL)
    close(outs[2], outs[0], TOL)


@pytest.mark.parametrize("opt_level", [0, 2])
def test_gqa_with_head_dim_per_head_mask_and_dropout(opt_level):
    """head_dim=6 (inner 24 for d=16), a per-head bool mask [B, heads, T, T] (one slice per query head),
    dropout (none at inference)."""
    text = spec("x: 'f32[B, T, d]', m: 'bool[B, 4, T, T]'",
                "y = attention(x, heads=4, kv_heads=2, head_dim=6, mask=m, dropout=0.1)")
    model, sd = built(text, opt_level)
    assert sd["y.k.weight"].shape == (12, 16) and sd["y.q.weight"].shape == (24, 16)
    x = rand(2, 5, D, seed=3)
    m = rand(2, 4, 5, 5, seed=4) > 0
    m[..., 0] = True
    want = lin(reference(lin(x, sd, "y.q"), lin(x, sd, "y.k"), lin(x, sd, "y.v"), 4, 2, keep=m), sd, "y.o")
    close(run(model, x, m), want, TOL)


@pytest.mark.parametrize("opt_level", [0, 1])
def test_cross_attention_keys_and_values_of_kv_heads(opt_level):
    """kv= of another width (12) and length S=3: k, v [kv_heads dh, 12]."""
    text = spec("x: 'f32[B, T, d]', c: 'f32[B, S, 12]'", "y = attention(x, heads=4, kv_heads=1, kv=c)")
    model, sd = built(text, opt_level)
    assert sd["y.k.weight"].shape == (4, 12) and sd["y.v.weight"].shape == (4, 12)
    x, c = rand(2, 5, D, seed=5), rand(2, 3, 12, seed=6)
    want = lin(reference(lin(x, sd, "y.q"), lin(c, sd, "y.k"), lin(c, sd, "y.v"), 4, 1), sd, "y.o")
    close(run(model, x, c), want, TOL)


@pytest.mark.parametrize("opt_level", [0, 2])
def test_prefix_rows_have_the_width_of_the_keys(opt_level):
    """A prefix [B, 2, l, kv_heads * dh]: each prefix key/value head is repeated like the projected ones."""
    text = spec("x: 'f32[B, T, d]', p: 'f32[B, 2, l, 8]'",
                "y = attention(x, heads=4, kv_heads=2, causal=true, prefix=p)")
    model, sd = built(text, opt_level)
    x, p = rand(2, 5, D, seed=7), rand(2, 2, 2, 8, seed=8)
    want = reference(lin(x, sd, "y.q"), lin(x, sd, "y.k"), lin(x, sd, "y.v"), 4, 2, causal=True,
                     pk=p[:, 0], pv=p[:, 1])
    close(run(model, x, p), lin(want, sd, "y.o"), TOL)


# ---------------------------------------------------------------------------------------------
# defaults, shapes, FLOPs, errors
# ---------------------------------------------------------------------------------------------

def test_default_is_multi_head_attention_with_unchanged_ir_and_code(tmp_path):
    from specc.compiler.printer import print_graph

    plain = spec("x: 'f32[B, T, d]'", "y = attention(x, heads=4, causal=true)")
    text = print_graph(specc.compile(plain))
    assert "kv_heads" not in text  # printed only when given
    gqa = spec("x: 'f32[B, T, d]'", "y = attention(x, heads=4, kv_heads=2, causal=true)")
    assert "kv_heads=2)" in print_graph(specc.compile(gqa))
    specc.build(plain, tmp_path / "plain")
    code = (tmp_path / "plain" / "model.py").read_text()
    assert "MultiHeadAttention(16, heads=4, causal=True, sdpa=True)" in code and "GQA" not in code and "kv_heads" not in code
    specc.build(gqa, tmp_path / "gqa")
    code = (tmp_path / "gqa" / "model.py").read_text()
    assert "MultiHeadAttentionGQA(16, heads=4, kv_heads=2, causal=True, sdpa=True)" in code
    assert code.index("class MultiHeadAttention(") < code.index("class MultiHeadAttentionGQA(")


def test_parameter_shapes():
    for kv_heads, rows in ((1, 4), (2, 8), (4, 16)):
        text = spec("x: 'f32[B, T, d]'", f"y = attention(x, heads=4, kv_heads={kv_heads})")
        (node,) = [n for _, n in specc.compile(text).nodes() if n.op == "attention"]
        shapes = {p.name: p.shape for p in node.params}
        assert shapes == {"q.weight": (16, 16), "q.bias": (16,), "k.weight": (rows, 16), "k.bias": (rows,),
                          "v.weight": (rows, 16), "v.bias": (rows,), "o.weight": (16, 16), "o.bias": (16,)}
        sd = specc.load(text, opt_level=0).state_dict()
        assert tuple(sd["y.k.weight"].shape) == (rows, 16) and tuple(sd["y.v.weight"].shape) == (rows, 16)


@pytest.mark.parametrize("rope", [False, True])
def test_flops_count_the_smaller_key_and_value_projections(rope):
    """2 B T d (heads dh) per q and o, 2 B T d (kv_heads dh) per k and v; scores and weighted sum as with
    heads key/value heads; rope 3 FLOPs per turned channel of q (heads heads) and k (kv_heads heads)."""
    r = ", rope=10000" if rope else ""
    mha = flops_of(spec("x: 'f32[B, T, d]'", f"y = attention(x, heads=4{r})"), "attention")
    for kv_heads in (1, 2, 4):
        got = flops_of(spec("x: 'f32[B, T, d]'", f"y = attention(x, heads=4, kv_heads={kv_heads}{r})"), "attention")
        bt, dh = 2 * 5, 4
        saved = 2 * 2 * bt * D * (4 - kv_heads) * dh + (3 * bt * (4 - kv_heads) * dh if rope else 0)
        assert got == mha - saved, (kv_heads, got, mha)


@pytest.mark.parametrize("graph,col,message", [
    ("y = attention(x, heads=4, kv_heads=3)", 29,
     "attention: kv_heads=3 must be positive and divide heads=4 (each group of heads / kv_heads query heads "
     "shares one key/value head)"),
    ("y = attention(x, heads=4, causal=true, kv_heads=0)", 42,
     "attention: kv_heads=0 must be positive and divide heads=4 (each group of heads / kv_heads query heads "
     "shares one key/value head)"),
    ("y = attention(x, heads=4, kv_heads=2, prefix=p)", 41,
     "attention: the prefix must be [..., 2, l, 8] (l key rows, then l value rows, of width kv_heads * head_dim), "
     "got f32[B, 2, 2, 16]"),
])
def test_errors_are_located(graph, col, message):
    text = spec("x: 'f32[B, T, d]', p: 'f32[B, 2, l, d]'", graph)
    assert_error(text, 7, col, message)


# ---------------------------------------------------------------------------------------------
# pruning and training prefixes
# ---------------------------------------------------------------------------------------------

def test_pruning_leaves_gqa_heads_whole():
    from specc.compiler.passes.prune import PruneError, prunable_layers, prune_structure

    text = spec("x: 'f32[B, T, d]'", "a = attention(x, heads=4, kv_heads=2)\ny = mlp(a, hidden=8)")
    graph = specc.compile(text)
    layers = {layer.path: layer for layer in prunable_layers(graph)}
    assert "grouped-query attention (kv_heads=2 < heads=4)" in layers["a"].reason
    assert layers["y"].reason is None
    with pytest.raises(PruneError, match="grouped-query attention"):
        prune_structure(graph, {"a": [0, 1]})
    assert prune_structure(graph, {"y": [0, 3]}).modified
    # kv_heads = heads is plain multi-head attention: its heads prune as before
    plain = specc.compile(spec("x: 'f32[B, T, d]'", "y = attention(x, heads=4, kv_heads=4)"))
    assert prunable_layers(plain)[0].reason is None
    assert prune_structure(plain, {"y": [1, 2]}).modified


def test_training_prefix_has_the_key_width():
    from specc.backends.pytorch.build import artifacts, load_in_memory
    from specc.train.peft import transform

    text = spec("x: 'f32[B, T, d]'", "y = attention(x, heads=4, kv_heads=2, rope=100)")
    graph = transform(specc.compile(text), prefixes=["y"], length=3)
    (p,) = [p for _, n in graph.nodes() if n.op == "parameter" for p in n.params]
    assert p.shape == (2, 3, 8)
    model = load_in_memory(artifacts(graph, text, "gqa.yaml", ctx=PassContext(opt_level=1)))
    assert tuple(model(torch.randn(2, 5, 16)).shape) == (2, 5, 16)


# ---------------------------------------------------------------------------------------------
# TVM
# ---------------------------------------------------------------------------------------------

TVM_SPEC = """\
specc: 1
name: gqa
dims:
  B: 2
  T: {example: 5, max: 16}
inputs:
  x: f32[B, T, 16]
  m: bool[B, T, T]
graph: |
  a = attention(x, heads=4, kv_heads=2, causal=true, rope=10000)
  b = attention(x, heads=4, kv_heads=1, mask=m, prefix=parameter(2, 3, 4), head_dim=4)
  c = attention(x, heads=4, kv_heads=2, qkv=true, rope=100.0, rope_dim=2)
outputs:
  a:
  b:
  c:
"""


def test_tvm_llvm_matches_torch():
    """One library at two lengths: the fused CPU kernel over repeated k/v (a; c with the fused qkv
    projection split in three), the written-out core with a mask and a repeated prefix (b)."""
    pytest.importorskip("tvm")
    from test_tvm_ops import check

    check(TVM_SPEC, [dict(B=1, T=5), dict(B=3, T=9)], "gqa")


def test_tvm_cuda_codegen():
    """The CUDA path without a GPU (as tests/test_tvm_cuda.py): every kernel scheduled, CUDA C generated."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import device_source

    src = device_source(specc.compile(TVM_SPEC), {"kind": "cuda", "arch": "sm_90"})
    assert "__global__" in src and "threadIdx.x" in src


TVM_SPEC64 = """\
specc: 1
name: gqa64
dims:
  B: 2
  T: {example: 5, max: 16}
inputs:
  x: f64[B, T, 16]
  m: bool[B, T, T]
  p: f64[B, 2, 3, 4]
graph: |
  a = attention(x, heads=4, kv_heads=2, causal=true, rope=10000)
  b = attention(x, heads=4, kv_heads=1, mask=m, prefix=p)
outputs:
  a:
  b:
"""


def test_tvm_llvm_float64_matches_torch_to_1e_12():
    """float64 on the CPU: the fused kernel (a) and the written-out core (b) over repeated k/v heads."""
    pytest.importorskip("tvm")
    from test_tvm_ops import float64_run, noisy
    from specc.backends.pytorch.build import artifacts, load_in_memory
    from specc.backends.pytorch.weights import init_weights
    from specc.backends.tvm.build import compile_graph

    graph = specc.compile(TVM_SPEC64)
    weights = noisy(init_weights(graph))
    model = load_in_memory(artifacts(graph, TVM_SPEC64, "gqa64.yaml"))
    model.load_state_dict(weights)
    runner = compile_graph(graph, weights=weights)
    for seed, dims in enumerate([dict(B=1, T=5), dict(B=3, T=9)]):
        inputs = model.example_inputs(seed=seed, **dims)
        for g, w in zip(runner(*inputs), float64_run(model.double(), inputs)):
            assert g.dtype == torch.float64
            close(g, w, TOL)
