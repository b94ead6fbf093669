"""Hand-written CPU kernels in TIR for what the schedule rules cannot reach (fused attention), and the
vectorisable float32 exp / sigmoid / tanh they and the LSTM/GRU scan kernel (lowering.py) use.

`attention_kernel` is softmax(q k^T * scale [causal]) v for every (batch row, head) in one parallel
loop, reading q, k, v as the projections write them ([N, L, heads * dh], a head a column slice) and
writing the heads concatenated: no head transposes, no [L, L] score matrix in memory. Per (batch
row, head) task: k's head is packed transposed ([dh, keys], padded to whole register tiles with
zeros) and v's copied contiguous; then per block of QB query rows: the scores of the keys the block
can see (all, or up to its last row when causal) are accumulated in a QB x KC register tile over
dh, vectorised along the keys, and written scaled into a QB-row scratch (-inf past each row's last
visible key) with each row's running lane maxima; each row's exp(score - max) and its sum
(vectorised) turn them into unnormalised probabilities; then
QB x EC register tiles of the output accumulate probabilities x v over the keys, vectorised along
dh, and are written scaled by 1 / the row's sum. Query rows past the end (a ragged last block)
compute a copy of the last row and are not written.

Float32 uses the polynomial exp of `fast_exp_f32` (vectorises; TVM's fast_exp), float64 libm's. As
torch: a row that sees a NaN score is NaN, a row with no keys is 0, a hidden key never matters.
"""

from __future__ import annotations

from typing import Any, Callable

import tvm
from tvm import tirx


def fast_exp_f32(x: Any) -> Any:
    """exp(x) for float32 as topi.fast_exp computes it (range reduction to 2^n and a degree-7
    polynomial; relative error <= 3.5e-7), written on a PrimExpr so that it vectorises inside
    hand-written kernels (LLVM calls scalar libm for exp)."""
    f = lambda v: tirx.const(v, "float32")  # noqa: E731
    p = [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1]
    xc = tirx.max(tirx.min(x, f(88.3762626647950)), f(-88.3762626647949))
    n = tirx.floor(xc * f(1.44269504088896341) + f(0.5))
    r = xc - n * f(0.6931471805599453)
    y = f(p[0])
    for c in p[1:]:
        y = y * r + f(c)
    y = y * r * r + r + f(1.0)
    scale = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n + f(127.0)), tirx.const(23, "int32")))
    return tirx.max(scale * y, x)


def fast_tanh_f32(x: Any) -> Any:
    """tanh(x) for float32 as a rational polynomial (topi.fast_tanh's; absolute error <= 4e-7), vectorisable."""
    f = lambda v: tirx.const(v, "float32")  # noqa: E731
    alpha = [4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
             -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16]
    beta = [4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06]
    xc = tirx.max(tirx.min(x, f(7.90531110763549805)), f(-7.90531110763549805))
    x2 = xc * xc
    p = f(alpha[-1])
    for c in reversed(alpha[:-1]):
        p = x2 * p + f(c)
    q = f(beta[-1])
    for c in reversed(beta[:-1]):
        q = x2 * q + f(c)
    return xc * p / q


def exp_fn(dtype: str) -> Callable[[Any], Any]:
    """The exp a kernel uses: the vectorisable polynomial in float32, libm's otherwise."""
    return fast_exp_f32 if dtype == "float32" else tirx.exp


def gate_fns(dtype: str) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(sigmoid, tanh): the vectorisable polynomials in float32, libm in float64."""
    if dtype == "float32":
        one = tirx.const(1.0, "float32")
        return (lambda v: one / (one + fast_exp_f32(-v))), fast_tanh_f32
    return tirx.sigmoid, tirx.tanh


def nan_test(dtype: str) -> Callable[[Any], Any]:
    """x -> whether x is NaN, from its bits (exponent all ones, mantissa not zero): LLVM may fold the
    usual x != x away under the fast-math flags TVM compiles with."""
    bits = tvm.DataType(dtype).bits
    ity, mbits = ("int32", 23) if bits == 32 else ("int64", 52)
    inf_bits = ((1 << (bits - 1 - mbits)) - 1) << mbits  # +inf's bit pattern
    return lambda x: tirx.bitwise_and(tirx.reinterpret(ity, x), tirx.const((1 << (bits - 1)) - 1, ity)) > \
        tirx.const(inf_bits, ity)


def attention_tiles(dh: int, lanes: int) -> tuple[int, int, int]:
    """(QB query rows, KC keys, EC output columns) of the register tiles: QB x 2 vectors of
    accumulators (16 of AVX-512's 32 registers; 8 of AVX2's 16), EC the widest of 2, 1 vectors (or
    8, 4, 2, 1 elements) dividing dh."""
    qb = 8 if lanes >= 16 else 4
    kc = 2 * lanes
    ec = next(n for n in (2 * lanes, lanes, 8, 4, 2, 1) if dh % n == 0)
    return qb, kc, ec


def attention_kernel(heads: int, dh: int, causal: bool, dtype: str, scale: float, lanes: int = 16,
                     layout: tuple = ()) -> tirx.PrimFunc:
    """softmax(q k^T * scale) v per head over q [N, LQ, heads * dh], k, v [N, LK, heads * dh] -> out
    [N, LQ, heads * dh]; causal: key j is visible from query i when j <= i (see the module doc).
    `layout`: ((width, offset) of q, of k, of v): each read as columns offset..offset + heads * dh of
    a [N, L, width] tensor (q, k and v as column blocks of one fused projection); default (d, 0) each."""
    from tvm.script import tirx as T

    QB, KC, EC = attention_tiles(dh, lanes)
    d = heads * dh
    (wq, oq), (wk, ok), (wv, ov) = layout or ((d, 0),) * 3
    exp = exp_fn(dtype)
    zero, ninf = tirx.const(0.0, dtype), tirx.const(float("-inf"), dtype)
    one, sc = tirx.const(1.0, dtype), tirx.const(scale, dtype)
    cz = 1 if causal else 0
    is_nan = nan_test(dtype)
    vec = f"{dtype}x{KC}"

    @T.prim_func(private=True)
    def attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        N = T.int64()
        LQ = T.int64()
        LK = T.int64()
        q = T.match_buffer(var_q, (N, LQ, wq), dtype)
        k = T.match_buffer(var_k, (N, LK, wk), dtype)
        v = T.match_buffer(var_v, (N, LK, wv), dtype)
        out = T.match_buffer(var_out, (N, LQ, d), dtype)
        for bh in T.parallel(N * heads):
            kt = T.decl_buffer((dh, (LK + KC - 1) // KC * KC), dtype)
            vp = T.decl_buffer((LK, dh), dtype)
            s = T.decl_buffer((QB, (LK + KC - 1) // KC * KC), dtype)
            acc = T.decl_buffer((QB, KC), dtype, scope="local")
            mx = T.decl_buffer((QB, KC), dtype, scope="local")
            nan = T.decl_buffer((QB, KC), dtype, scope="local")
            oacc = T.decl_buffer((QB, EC), dtype, scope="local")
            red = T.decl_buffer((KC,), dtype, scope="local")
            inv = T.decl_buffer((QB,), dtype, scope="local")
            mrow = T.decl_buffer((QB,), dtype, scope="local")
            b = bh // heads
            col = bh % heads * dh
            # k's head, transposed, zero-padded to whole key tiles; v's head contiguous (its rows in
            # place sit d apart: for d = 256, every 4th row in the same L1 sets)
            for j in range(LK):
                for e in range(dh):
                    kt[e, j] = k[b, j, ok + col + e]
            for j in range((LK + KC - 1) // KC * KC - LK):
                for e in range(dh):
                    kt[e, LK + j] = zero
            for j in range(LK):
                for e in T.vectorized(dh):
                    vp[j, e] = v[b, j, ov + col + e]
            for qb in range((LQ + QB - 1) // QB):
                # the keys this block of rows can see (causal: up to its last row)
                nk = T.min(qb * QB + QB, LK) * cz + LK * (1 - cz)
                # scores: QB x KC register tiles over dh, written scaled (-inf past each row's last
                # visible key) with each row's running lane maxima
                for r in T.unroll(QB):
                    for jj in T.vectorized(KC):
                        mx[r, jj] = ninf
                        nan[r, jj] = zero
                for c in range((nk + KC - 1) // KC):
                    for r in T.unroll(QB):
                        for jj in T.vectorized(KC):
                            acc[r, jj] = zero
                    for e in range(dh):
                        for r in T.unroll(QB):
                            for jj in T.vectorized(KC):
                                acc[r, jj] = acc[r, jj] + q[b, T.min(qb * QB + r, LQ - 1), oq + col + e] * kt[e, c * KC + jj]
                    for r in T.unroll(QB):
                        for jj in T.vectorized(KC):
                            s[r, c * KC + jj] = T.Select(
                                c * KC + jj < T.min(T.min(qb * QB + r, LQ - 1) + 1, LK) * cz + LK * (1 - cz),
                                acc[r, jj] * sc, ninf)
                            mx[r, jj] = T.max(mx[r, jj], s[r, c * KC + jj])
                            nan[r, jj] = nan[r, jj] + T.Select(is_nan(s[r, c * KC + jj]), one, zero)
                # each row: exp(score - its max) (0 for the -inf of hidden keys), and 1 / their sum
                for r in range(QB):
                    mrow[r] = T.call_llvm_pure_intrin(dtype, "llvm.vector.reduce.fmax", mx.vload([r, 0], vec))
                    for jj in T.vectorized(KC):
                        red[jj] = zero
                    for c in range((nk + KC - 1) // KC):
                        for jj in T.vectorized(KC):
                            s[r, c * KC + jj] = T.Select(s[r, c * KC + jj] > ninf, exp(s[r, c * KC + jj] - mrow[r]),
                                                         zero)
                            red[jj] = red[jj] + s[r, c * KC + jj]
                    # 1 / the sum; NaN for a row that saw a NaN score (as torch), 0 for a row with no keys
                    inv[r] = T.call_llvm_pure_intrin(dtype, "llvm.vector.reduce.fadd", zero, red.vload([0], vec))
                    inv[r] = T.Select(T.call_llvm_pure_intrin(dtype, "llvm.vector.reduce.fadd", zero,
                                                              nan.vload([r, 0], vec)) > zero,
                                      tirx.const(float("nan"), dtype), T.Select(inv[r] > zero, one / inv[r], zero))
                # probabilities x v: QB x EC register tiles over the visible keys
                for ec in range(dh // EC):
                    for r in T.unroll(QB):
                        for e in T.vectorized(EC):
                            oacc[r, e] = zero
                    # the keys every row of the block sees, then (causal) the diagonal, where a row
                    # skips the keys after it (a hidden key's probability is 0, but 0 x NaN is not)
                    for j in range(T.min(qb * QB + 1, LK) * cz + nk * (1 - cz)):
                        for r in T.unroll(QB):
                            for e in T.vectorized(EC):
                                oacc[r, e] = oacc[r, e] + s[r, j] * vp[j, ec * EC + e]
                    for jd in range(nk - T.min(qb * QB + 1, LK) * cz - nk * (1 - cz)):
                        for r in T.unroll(QB):
                            for e in T.vectorized(EC):
                                oacc[r, e] = oacc[r, e] + T.Select(
                                    T.min(qb * QB + 1, LK) + jd <= T.min(qb * QB + r, LQ - 1),
                                    s[r, T.min(qb * QB + 1, LK) + jd] * vp[T.min(qb * QB + 1, LK) + jd, ec * EC + e],
                                    zero)
                    for r in range(QB):
                        if qb * QB + r < LQ:
                            for e in T.vectorized(EC):
                                out[b, qb * QB + r, col + ec * EC + e] = oacc[r, e] * inv[r]

    return attention


def fused_attention(bb: Any, kernels: dict, q: Any, k: Any, v: Any, batch: list, t_len: Any, s_len: Any, d: int,
                    heads: int, causal: bool, dtype: str, lanes: int, layout: tuple = ()) -> Any:
    """Emit the call of `attention_kernel` on q [*batch, T, wq], k, v [*batch, S, wk / wv] (batch already
    broadcast; widths and column offsets in `layout`, default d and 0): the batch axes flattened (a
    view), the output [*batch, T, d]. q, k and v may be one tensor (a fused projection)."""
    from tvm import relax
    from tvm.relax.op import reshape

    i64 = lambda n: tirx.IntImm("int64", n)  # noqa: E731
    layout = tuple(layout) or ((d, 0),) * 3
    rows = i64(1)
    for b in batch:
        rows = rows * b
    dh = d // heads
    lanes = max(1, lanes * 32 // tvm.DataType(dtype).bits)  # `lanes` counts float32 lanes
    key = ("attention", heads, dh, causal, dtype, lanes, layout)
    if key not in kernels:
        name = f"attention_h{heads}_d{dh}{'_causal' if causal else ''}{'_packed' if layout[0][0] != d else ''}"
        kernels[key] = bb.add_func(attention_kernel(heads, dh, causal, dtype, 1.0 / dh ** 0.5, lanes, layout), name)
    flat = {}

    def view(x: Any, n: Any, width: int) -> Any:
        if id(x) not in flat:
            flat[id(x)] = bb.emit(reshape(x, [rows, n, i64(width)]))
        return flat[id(x)]

    args = [view(q, t_len, layout[0][0]), view(k, s_len, layout[1][0]), view(v, s_len, layout[2][0])]
    y = bb.emit(relax.call_tir(kernels[key], args, out_ty=relax.TensorType([rows, t_len, i64(d)], dtype)))
    return reshape(y, list(batch) + [t_len, i64(d)])


__all__ = ["attention_kernel", "fused_attention", "nan_test", "attention_tiles", "exp_fn", "fast_exp_f32", "fast_tanh_f32", "gate_fns"]
