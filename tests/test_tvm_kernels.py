"""The hand-written CPU kernels (backends/tvm/kernels.py and the LSTM kernel) against float64 references.

The fused attention kernel is checked directly (numpy in, numpy out) over the cases its tiling has
branches for: causal and not, query and key lengths that are not multiples of the QB-row and KC-key
tiles, lengths shorter than a tile, one query row, head widths that are not multiples of the vector
width (dh = 3, 5, 24), q/k/v as column blocks of one fused projection, float32 (polynomial exp) and
float64 (libm), AVX-512 and AVX2 tile sizes; then through specs (self-attention, cross-attention
with `kv=`, `attend`, the -O2 build whose q/k/v come from one fused projection) against the PyTorch
backend in float64. Tolerances: float32 max |error| <= 2e-6 on unit-scale inputs (the kernel's
error is float32 rounding, ~1e-7 per operation over at most ~100-term sums); float64 <= 1e-12.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402

import specc  # noqa: E402
from specc.backends.pytorch.build import artifacts, load_in_memory  # noqa: E402
from specc.backends.pytorch.weights import init_weights, materialise  # noqa: E402
from specc.backends.tvm.build import compile_graph, make_target  # noqa: E402
from specc.backends.tvm.kernels import attention_kernel, attention_tiles  # noqa: E402
from specc.compiler.passes import PassContext, optimize  # noqa: E402

_LIBS: dict = {}


def _kernel(heads: int, dh: int, causal: bool, dtype: str, lanes: int, layout: tuple = ()):
    key = (heads, dh, causal, dtype, lanes, layout)
    if key not in _LIBS:
        f = attention_kernel(heads, dh, causal, dtype, 1.0 / math.sqrt(dh), lanes, layout)
        mod = tvm.IRModule({"attention": f.with_attr("global_symbol", "attention")})
        _LIBS[key] = tvm.compile(mod, make_target("llvm"))["attention"]
    return _LIBS[key]


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, causal: bool) -> np.ndarray:
    """softmax(q k^T / sqrt(dh) [causal: key j <= query i]) v per head, in float64."""
    n, lq, d = q.shape
    lk, dh = k.shape[1], d // heads
    split = lambda x, length: torch.from_numpy(x).double().reshape(n, length, heads, dh).transpose(1, 2)  # noqa: E731
    att = split(q, lq) @ split(k, lk).transpose(-1, -2) / math.sqrt(dh)
    if causal:
        att = att.masked_fill(torch.arange(lk)[None, :] > torch.arange(lq)[:, None], float("-inf"))
    return (att.softmax(-1) @ split(v, lk)).transpose(1, 2).reshape(n, lq, d).numpy()


def run(fn, q: np.ndarray, k: np.ndarray, v: np.ndarray, d: int) -> np.ndarray:
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full(q.shape[:2] + (d,), np.nan, q.dtype), dev)
    fn(*(tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (q, k, v)), out)
    return out.numpy()


CASES = [  # heads, dh, causal, n, lq, lk
    (4, 64, True, 2, 128, 128),  # gpt's shape: whole tiles
    (3, 5, True, 2, 7, 7),       # shorter than a tile; dh of no vector width
    (2, 24, False, 3, 9, 37),    # cross lengths, ragged key tile
    (2, 8, True, 1, 40, 13),     # causal with more queries than keys
    (1, 3, False, 2, 1, 1),      # one query, one key
    (2, 16, True, 1, 70, 70),    # ragged query block and key tile
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lanes", [16, 8])
@pytest.mark.parametrize("heads,dh,causal,n,lq,lk", CASES)
def test_attention_kernel_matches_float64(heads, dh, causal, n, lq, lk, dtype, lanes):
    rng = np.random.default_rng(heads * 1000 + lq)
    d = heads * dh
    q, k, v = (rng.standard_normal((n, length, d)).astype(dtype) for length in (lq, lk, lk))
    got = run(_kernel(heads, dh, causal, dtype, lanes), q, k, v, d)
    want = reference(q, k, v, heads, causal)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= (2e-6 if dtype == "float32" else 1e-12)


def test_attention_kernel_reads_q_k_v_as_column_blocks_of_one_projection():
    """layout ((3d, 0), (3d, d), (3d, 2d)): q, k, v are the column blocks of one [N, L, 3d] tensor."""
    heads, dh, n, length = 3, 8, 2, 19
    d = heads * dh
    qkv = np.random.default_rng(0).standard_normal((n, length, 3 * d)).astype("float32")
    fn = _kernel(heads, dh, True, "float32", 16, ((3 * d, 0), (3 * d, d), (3 * d, 2 * d)))
    got = run(fn, qkv, qkv, qkv, d)
    want = reference(qkv[..., :d].copy(), qkv[..., d:2 * d].copy(), qkv[..., 2 * d:].copy(), heads, True)
    assert np.abs(got - want).max() <= 2e-6


def test_attention_kernel_softmax_is_stable_for_large_scores():
    """Scores of +-1e4 (exp overflows without the row max): still the float64 softmax."""
    rng = np.random.default_rng(3)
    q = (rng.standard_normal((1, 20, 16)) * 100).astype("float32")
    k = (rng.standard_normal((1, 20, 16)) * 100).astype("float32")
    v = rng.standard_normal((1, 20, 16)).astype("float32")
    got = run(_kernel(2, 8, True, "float32", 16), q, k, v, 16)
    want = reference(q, k, v, 2, True)
    assert np.isfinite(got).all() and np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_attention_kernel_nan_reaches_exactly_the_queries_that_see_it(where):
    """A NaN at row 9 of q, k or v (column 3: head 0) in a causal layer: NaN in q's row 9 (head 0), in
    k's or v's key 9 for the queries that see it (rows >= 9; k: the whole head, v: its column 3); a
    hidden key never matters (torch's math path puts v's NaN in every row, as 0 x NaN, and its fused
    kernel does not); every other value as the float64 reference."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 21, 16)).astype("float32") for _ in range(3))
    {"q": q, "k": k, "v": v}[where][1, 9, 3] = np.nan
    got = run(_kernel(2, 8, True, "float32", 16), q, k, v, 16)
    expected = np.zeros(got.shape, bool)
    if where == "q":
        expected[1, 9, :8] = True
    elif where == "k":
        expected[1, 9:, :8] = True
    else:
        expected[1, 9:, 3] = True
    assert (np.isnan(got) == expected).all(), np.argwhere(np.isnan(got)).tolist()
    clean = [np.nan_to_num(x) for x in (q, k, v)]
    want = reference(*clean, 2, True)
    assert np.abs(got[~expected] - want[~expected]).max() <= 2e-6


def test_attention_kernel_without_keys_gives_zeros():
    """No keys (S = 0): torch's softmax over nothing times an empty v is 0, not NaN."""
    q = np.ones((2, 3, 8), "float32")
    k = v = np.ones((2, 0, 8), "float32")
    assert (run(_kernel(1, 8, False, "float32", 16), q, k, v, 8) == 0).all()


def test_attention_tiles_fit_the_registers():
    assert attention_tiles(64, 16) == (8, 32, 32)  # AVX-512: 8 x 2 accumulators of 16 floats
    assert attention_tiles(64, 8) == (4, 16, 16)   # AVX2: 4 x 2 of 8
    assert attention_tiles(24, 16) == (8, 32, 8)   # dh 24: 8 floats per output tile
    assert attention_tiles(5, 16)[2] == 1


def _spec(inputs: str, graph: str, out: str) -> str:
    return (f"specc: 1\nname: att\ndims:\n  B: 2\n  T: 5\n  S: 7\ninputs:\n{inputs}\ngraph: |\n{graph}\n"
            f"outputs:\n  y: {out}\n")


SPECS = {
    "self_causal": _spec("  x: f32[B, T, 24]", "  y = attention(x, 3, causal=true)", "f32[B, T, 24]"),
    "cross": _spec("  x: f32[B, T, 16]\n  c: f32[B, S, 16]", "  y = attention(x, 2, kv=c)", "f32[B, T, 16]"),
    "attend": _spec("  q: f32[B, T, 12]\n  k: f32[B, S, 12]\n  v: f32[B, S, 12]", "  y = attend(q, k, v, 3)",
                    "f32[B, T, 12]"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("opt_level", [0, 2])
def test_attention_through_specs_matches_the_pytorch_backend(name, opt_level):
    """The kernel inside a model (at -O2 self-attention's q/k/v come from one fused projection, read in
    place): the same outputs as the PyTorch backend's module in float64, at two sizes of one library."""
    text = SPECS[name]
    source = specc.compile(text)
    gen = torch.Generator().manual_seed(1)
    base = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in sorted(init_weights(source).items())}
    ctx = PassContext(opt_level=opt_level)
    graph, _ = optimize(source, ctx)
    runner = compile_graph(graph, weights=materialise(graph, base))
    model = load_in_memory(artifacts(source, text, "att.yaml", weights=base, ctx=ctx)).double()
    for dims in (dict(B=1, T=1, S=1), dict(B=3, T=11, S=9)):
        inputs = model.example_inputs(seed=2, **dims)
        with torch.no_grad():
            want = model(*[x.double() for x in inputs])
        got = runner(*inputs)
        assert tuple(got.shape) == tuple(want.shape)
        assert (got.double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
