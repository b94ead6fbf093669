"""Rotary position embeddings inside attention: attention(x, heads, rope=base, rope_dim=r).

Oracles: a multi-head attention with RoPE written out here in float64 (angles from math.cos/sin, each
pair (j, j + r/2) of a head's first r channels turned by p * base ** (-2j / r), prefix rows unrotated);
the relative-position property (shifting every position leaves every query-key score unchanged);
structured pruning against the unpruned model with the heads masked; tvm-llvm against the torch
backend. FLOPs against their formula; shape-rule errors at their exact line:col.

Tolerances: generated float64 module vs the float64 reference, and the exact properties in float64:
max abs error <= 1e-12 (the same math in a different order of float64 operations). tvm-llvm (float32)
vs the float64 torch oracle: <= 1e-4 * max(1, max |oracle|) (tests/test_tvm_ops.py's tolerance).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import specc
from opcheck import assert_error, close, flops_of, load64, spec_text

TOL = 1e-12

spec = functools.partial(spec_text, dims="B: 2, T: 5", params="{d: 8, l: 3}")


def rand(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def turn(x, base, r, start=0):
    """RoPE of one head's rows x [n, dh] at positions start..start+n-1, written out pair by pair."""
    y = x.clone()
    half = r // 2
    for p in range(x.shape[0]):
        for j in range(half):
            a = (start + p) * base ** (-2.0 * j / r)
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[p, j].item(), x[p, j + half].item()
            y[p, j], y[p, j + half] = x1 * c - x2 * s, x2 * c + x1 * s
    return y


def reference(q, k, v, heads, base, r, causal=False, keep=None, pk=None, pv=None, rotate_prefix=False):
    """softmax(rope(q) rope(k)^T / sqrt(dh)) v per batch row and head. q, k, v [B, T, h * dh]; keep
    [B, T, T] bool; pk, pv [B, l, h * dh] prefix rows, before the keys, unrotated (rotate_prefix: as if
    they sat at positions 0..l-1 and the keys at l..l+T-1, the wrong reading this test rules out)."""
    b, t, w = q.shape
    dh = w // heads
    l = 0 if pk is None else pk.shape[1]
    out = torch.zeros(b, t, w, dtype=q.dtype)
    for i in range(b):
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            shift = l if rotate_prefix else 0
            qh, kh = turn(q[i, :, cols], base, r, shift), turn(k[i, :, cols], base, r, shift)
            vh = v[i, :, cols]
            if l:
                ph = turn(pk[i, :, cols], base, r) if rotate_prefix else pk[i, :, cols]
                kh, vh = torch.cat([ph, kh]), torch.cat([pv[i, :, cols], vh])
            scores = qh @ kh.T / math.sqrt(dh)
            for row in range(t):
                for col in range(t):
                    if (causal and col > row) or (keep is not None and not keep[i, row, col]):
                        scores[row, l + col] = float("-inf")
            out[i, :, cols] = torch.softmax(scores, dim=-1) @ vh
    return out


# ---------------------------------------------------------------------------------------------
# against the written-out reference
# ---------------------------------------------------------------------------------------------

CASES = {  # name: (attention call, inputs, heads, base, r)
    "whole-head-causal": ("attention(x, heads=2, causal=true, rope=10000)", "", 2, 10000.0, 4),
    "partial-mask": ("attention(x, heads=2, mask=m, rope=100.0, rope_dim=2)", ", m: 'bool[B, T, T]'", 2, 100.0, 2),
    "head-dim": ("attention(x, heads=3, head_dim=4, rope=10000, rope_dim=2)", "", 3, 10000.0, 2),  # 12 != d
    "prefix-causal": ("attention(x, heads=2, causal=true, prefix=p, rope=50.0)", ", p: 'f32[B, 2, l, d]'", 2,
                      50.0, 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("opt_level", [0, 1, 2])  # math path; sdpa; sdpa with fused q/k/v
def test_rope_attention_matches_the_written_out_reference(case, opt_level):
    call, extra, heads, base, r = CASES[case]
    text = spec(f"x: 'f32[B, T, d]'{extra}", f"y = {call}")
    model = load64(text, opt_level)
    sd = specc.load(text, opt_level=0).double().state_dict()  # the unfused weights
    x = rand(2, 5, 8, seed=1)
    args, keep, pk, pv = (x,), None, None, None
    if "m:" in extra:
        keep = rand(2, 5, 5, seed=2) > 0
        keep[:, :, 0] = True  # every row sees one key at least
        args = (x, keep)
    if "p:" in extra:
        p = rand(2, 2, 3, 8, seed=3)
        args, pk, pv = (x, p), p[:, 0], p[:, 1]
    with torch.no_grad():
        got = model(*args)
    q, k, v = lin(x, sd, "y.q"), lin(x, sd, "y.k"), lin(x, sd, "y.v")
    want = lin(reference(q, k, v, heads, base, r, causal="causal" in call, keep=keep, pk=pk, pv=pv), sd, "y.o")
    close(got, want, TOL)
    # the rotation is not vacuous: the same attention without it differs
    plain = lin(reference(q, k, v, heads, base, 0, causal="causal" in call, keep=keep, pk=pk, pv=pv), sd, "y.o")
    assert (got - plain).abs().max().item() > 1e-3
    if pk is not None:  # prefix rows carry no position: rotating them (and the keys after them) differs
        shifted = reference(q, k, v, heads, base, r, causal=True, pk=pk, pv=pv, rotate_prefix=True)
        assert (got - lin(shifted, sd, "y.o")).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------------------
# relative positions
# ---------------------------------------------------------------------------------------------

def test_scores_depend_only_on_the_offset_between_positions():
    """q_i . k_j after the rotation of the generated module: the scores of x equal those of x placed
    after s other rows, for every pair (the absolute positions move by s, the offsets do not)."""
    text = spec("x: 'f32[B, T, d]'", "y = attention(x, heads=2, rope=100.0, rope_dim=2)")
    layer = load64(text, 0).y
    x, junk = rand(1, 5, 8, seed=4), rand(1, 3, 8, seed=5)
    shifted = torch.cat([junk, x], dim=1)

    def scores(t, rotate=True):
        q, k = layer.q(t), layer.k(t)
        if rotate:
            q, k = layer.rotate(q), layer.rotate(k)
        q, k = q.reshape(*q.shape[:2], 2, 4).transpose(1, 2), k.reshape(*k.shape[:2], 2, 4).transpose(1, 2)
        return q @ k.transpose(-1, -2)  # (1, h, T, T)

    with torch.no_grad():
        a, b = scores(x), scores(shifted)[..., 3:, 3:]
        plain = scores(x, rotate=False)
    close(a, b, TOL)
    assert (a - plain).abs().max().item() > 1e-3  # the rotation acts on the scores
    diagonal = torch.diagonal(a, dim1=-2, dim2=-1) - torch.diagonal(plain, dim1=-2, dim2=-1)
    close(diagonal, torch.zeros_like(diagonal), TOL)  # offset 0: q_i . k_i, each turned by the same angle


def test_outputs_are_invariant_under_a_shift_of_every_position():
    """Causal attention of x, and of x after s rows the mask hides from every query: the last T outputs
    are those of x (each query sees the same keys at the same offsets)."""
    text = spec("x: 'f32[B, T, d]', m: 'bool[B, T, T]'",
                "y = attention(x, heads=2, causal=true, mask=m, rope=100.0)")
    model = load64(text, 0)
    x, junk = rand(2, 5, 8, seed=6), rand(2, 3, 8, seed=7)
    shifted = torch.cat([junk, x], dim=1)
    m = torch.ones(2, 8, 8, dtype=torch.bool)
    m[:, :, :3] = False
    m[:, :3, 0] = True  # the hidden rows' own queries see something (their outputs are not compared)
    with torch.no_grad():
        y = model(x, torch.ones(2, 5, 5, dtype=torch.bool))
        ys = model(shifted, m)[:, 3:]
    close(ys, y, TOL)


# ---------------------------------------------------------------------------------------------
# FLOPs, IR, errors
# ---------------------------------------------------------------------------------------------

def test_flops_count_the_rotation_of_queries_and_keys():
    for call, heads, r in (("heads=2, rope=10000", 2, 4), ("heads=3, head_dim=6, rope=10.0, rope_dim=4", 3, 4)):
        with_rope = flops_of(spec("x: 'f32[B, T, d]'", f"y = attention(x, {call})"), "attention", B=3, T=7)
        plain = call.split(", rope")[0]
        without = flops_of(spec("x: 'f32[B, T, d]'", f"y = attention(x, {plain})"), "attention", B=3, T=7)
        assert with_rope - without == 3 * 2 * (3 * 7) * heads * r  # x*cos + rotate_half(x)*sin on q and k


def test_the_ir_names_base_and_width():
    text = spec("x: 'f32[B, T, d]'", "y = attention(x, heads=2, rope=10000, rope_dim=2)")
    from specc.compiler.printer import print_graph

    line = next(ln for ln in print_graph(specc.compile(text)).splitlines() if "attention(" in ln)
    assert "head_dim=none, rope=10000.0, rope_dim=2)" in line


def test_rope_errors_are_located():
    x = "x: 'f32[B, T, d]'"
    assert_error(spec(x + ", c: 'f32[B, T, d]'", "y = attention(x, 2, kv=c, rope=10000)"), 7, 29,
                 "attention: rope needs self-attention (no kv): positions of two sequences do not compare")
    assert_error(spec(x, "y = attention(x, 2, rope=10000, rope_dim=3)"), 7, 35,
                 "attention: rope_dim must be even and in [2, head_dim=4], got 3")
    assert_error(spec(x, "y = attention(x, 2, rope=10000, rope_dim=6)"), 7, 35,
                 "attention: rope_dim must be even and in [2, head_dim=4], got 6")
    assert_error(spec(x, "y = attention(x, 2, head_dim=3, rope=10000)"), 7, 35,
                 "attention: the head width (rotated whole by default) must be even and in [2, head_dim=3], got 3")
    assert_error(spec(x, "y = attention(x, 2, rope_dim=2)"), 7, 23,
                 "attention: rope_dim needs rotary embeddings, e.g. rope=10000")
    assert_error(spec(x, "y = attention(x, 2, rope=-1.0)"), 7, 23,
                 "attention: rope (the rotary base) must be positive, got -1.0")


# ---------------------------------------------------------------------------------------------
# passes: structured pruning keeps the rotation of the heads it keeps
# ---------------------------------------------------------------------------------------------

PRUNE = """specc: 1
name: rp
inputs: {x: 'f32[B, T, 16]'}
dims: {B: 2, T: 6}
graph: |
  y = attention(x, heads=4, causal=true, rope=100.0, rope_dim=2)
  z = attention(y, heads=2, qkv=true, rope=10000)
outputs:
  z:
"""


@pytest.mark.parametrize("opt_level", [0, 2])
def test_pruned_rope_heads_equal_the_masked_ones(opt_level):
    from test_prune import assert_same, masked_model, pruned_model
    from specc.backends.pytorch.weights import init_weights

    graph = specc.compile(PRUNE)
    weights = init_weights(graph)
    keep = {"y": [0, 2, 3], "z": [1]}
    pruned, model = pruned_model(graph, weights, keep, opt_level)
    for path, kept in keep.items():
        node = next(n for _, n in pruned.nodes() if ".".join(n.path) == path)
        assert node.attr("heads") == len(kept) and node.attr("rope") is not None
    assert_same(model, masked_model(graph, weights, keep), model.example_inputs)


# ---------------------------------------------------------------------------------------------
# tvm-llvm against the torch backend
# ---------------------------------------------------------------------------------------------

TVM_SPEC = """specc: 1
name: rope
dims: {B: 2, T: 5}
inputs: {x: 'f32[B, T, 12]', m: 'bool[B, T, T]', p: 'f32[2, 3, 12]'}
graph: |
  a = attention(x, heads=3, rope=10000, causal=true)
  b = attention(x, heads=2, rope=100.0, rope_dim=4, mask=m, prefix=p)
  c = attention(x, heads=3, head_dim=6, rope=500.0, rope_dim=2)
outputs:
  a:
  b:
  c:
"""


def test_tvm_llvm_matches_torch_at_two_lengths():
    """One library at T = 5 and T = 9 (the angle tables from the runtime length): the fused CPU kernel
    (a, c), the written-out core with a mask and an unrotated prefix (b)."""
    pytest.importorskip("tvm")
    from test_tvm_ops import check

    check(TVM_SPEC, [dict(B=1, T=5), dict(B=3, T=9)], "rope")


def test_tvm_llvm_fused_qkv_from_the_pass_pipeline():
    """-O2: q, k and v in one projection, rotated in place before the kernel reads its column blocks."""
    pytest.importorskip("tvm")
    from test_tvm_ops import TOL as TVM_TOL, float64_run, noisy
    from specc.backends.pytorch.build import artifacts, load_in_memory
    from specc.backends.pytorch.weights import init_weights, materialise
    from specc.backends.tvm.build import compile_graph
    from specc.compiler.passes import PassContext, optimize

    graph = specc.compile(TVM_SPEC)
    base = noisy(init_weights(graph))
    opt, _ = optimize(graph, PassContext(opt_level=2))
    assert all(n.attr("qkv") for _, n in opt.nodes() if n.op == "attention")
    runner = compile_graph(opt, weights=materialise(opt, base))
    model = load_in_memory(artifacts(graph, TVM_SPEC, "rope.yaml", ctx=PassContext(opt_level=0)))
    model.load_state_dict(base)
    oracle = model.double()
    for seed, dims in enumerate([dict(B=1, T=5), dict(B=3, T=9)]):
        inputs = model.example_inputs(seed=seed, **dims)
        for g, w in zip(runner(*inputs), float64_run(oracle, inputs)):
            err = (g.double() - w).abs().max().item()
            assert err <= TVM_TOL * max(1.0, w.abs().max().item()), f"at {dims}: {err:.3g}"


def test_tvm_cuda_codegen():
    """The CUDA path without a GPU (as tests/test_tvm_cuda.py): every kernel scheduled, CUDA C generated."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import device_source

    src = device_source(specc.compile(TVM_SPEC), {"kind": "cuda", "arch": "sm_90"})
    assert "__global__" in src and "cosf" in src and "sinf" in src
