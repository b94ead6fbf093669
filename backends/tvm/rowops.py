"""Row kernels for CPU: softmax, layer_norm and rms_norm over the last axis, vectorised.

TVM's legalised softmax and layer_norm reduce each row with a scalar dependency chain (one max or
add per element, 4 cycles of latency each) and, for a symbolic row length (attention over T), keep
the whole row's intermediates in buffers allocated per row. These kernels reduce each row into
`lanes` partial results (one vector register: 16 float32 on AVX-512) over the largest multiple of
`lanes`, then fold the lanes and the scalar tail; the elementwise parts (exp, normalisation) run
vectorised over the same main part with a scalar tail loop. Rows are spread over the threads.

`CPURowKernels` is the Relax pass that replaces R.nn.softmax / layer_norm / rms_norm over the last
axis (float32) with calls to these kernels (pre-scheduled, so the schedule rules leave them alone,
and opaque to fusion). Numerics: layer_norm uses two passes (mean, then the sum of squared
deviations), at least as accurate as TVM's one-pass sum/sum-of-squares; exp is TVM's fast_exp.
"""

from __future__ import annotations

from typing import Any, Callable

import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.ir import IRModule

_I64 = "int64"


def _i64(v: int) -> tirx.IntImm:
    return tirx.IntImm(_I64, v)


def _row_split(length: Any, lanes: int) -> tuple[Any, Any, bool]:
    """(number of full vectors, start of the tail, whether a tail can exist) for a row of `length`."""
    if isinstance(length, tirx.IntImm):
        n = int(length)
        return _i64(n // lanes), _i64(n // lanes * lanes), n % lanes != 0
    nc = tirx.floordiv(length, _i64(lanes))
    return nc, nc * _i64(lanes), True


def _lane_reduce(x_at: Callable, rows: list, nc: Any, lanes: int, combine: str, name: str) -> te.Tensor:
    """partial[rows..., l] = reduce over c < nc of x_at(rows, c * lanes + l)"""
    c = te.reduce_axis((_i64(0), nc), name=f"{name}_c")
    red = te.max if combine == "max" else te.sum
    return te.compute(tuple(rows) + (_i64(lanes),),
                      lambda *i: red(x_at(i[:-1], c * _i64(lanes) + i[-1]), axis=c), name=f"{name}_part")


def _fold(part: te.Tensor, x_at: Callable, rows: list, start: Any, length: Any, has_tail: bool, lanes: int,
          combine: str, name: str) -> te.Tensor:
    """total[rows...] = reduce of the lanes of `part` and of x_at over the tail [start, length)."""
    red = te.max if combine == "max" else te.sum
    l = te.reduce_axis((_i64(0), _i64(lanes)), name=f"{name}_l")
    head = te.compute(tuple(rows), lambda *i: red(part[i + (l,)], axis=l), name=f"{name}_lanes")
    if not has_tail:
        return head
    t = te.reduce_axis((_i64(0), length - start), name=f"{name}_t")
    tail = te.compute(tuple(rows), lambda *i: red(x_at(i, start + t), axis=t), name=f"{name}_tail")
    if combine == "max":
        return te.compute(tuple(rows), lambda *i: tirx.max(head(*i), tail(*i)), name=name)
    return te.compute(tuple(rows), lambda *i: head(*i) + tail(*i), name=name)


def softmax_te(x: te.Tensor, lanes: int, empty_rows_zero: bool = False) -> te.Tensor:
    """softmax over the last axis. empty_rows_zero: a row whose every value is -inf (an attention query
    that sees no key) gives zeros, as torch's scaled_dot_product_attention does, where plain softmax
    gives NaN; other rows, including those whose values are all the lowest finite number, are unchanged."""
    *rows_shape, length = x.shape
    nc, start, has_tail = _row_split(length, lanes)
    at = lambda i, k: x[tuple(i) + (k,)]  # noqa: E731
    mx = _fold(_lane_reduce(at, rows_shape, nc, lanes, "max", "mx"), at, rows_shape, start, length, has_tail,
               lanes, "max", "mx")
    delta = te.compute(x.shape, lambda *i: x(*i) - mx(*i[:-1]), name="delta")
    e = topi.fast_exp(delta)
    e_at = lambda i, k: e[tuple(i) + (k,)]  # noqa: E731
    s = _fold(_lane_reduce(e_at, rows_shape, nc, lanes, "sum", "s"), e_at, rows_shape, start, length, has_tail,
              lanes, "sum", "s")
    inv = te.compute(tuple(rows_shape), lambda *i: tirx.const(1.0, x.dtype) / s(*i), name="inv")
    if empty_rows_zero:
        # the max reduction starts at the lowest finite value, so a row of -inf has that max and exps of 0
        # (fast_exp flushes), a sum of 0; any other row's largest value gives exp(0) = 1, a sum >= 1
        half, zero = tirx.const(0.5, x.dtype), tirx.const(0.0, x.dtype)
        return te.compute(x.shape, lambda *i: tirx.Select(s(*i[:-1]) >= half, e(*i) * inv(*i[:-1]), zero),
                          name="softmax")
    return te.compute(x.shape, lambda *i: e(*i) * inv(*i[:-1]), name="softmax")


def _norm_te(x: te.Tensor, gamma: te.Tensor | None, beta: te.Tensor | None, eps: float, lanes: int,
             center: bool) -> te.Tensor:
    *rows_shape, length = x.shape
    nc, start, has_tail = _row_split(length, lanes)
    n = tirx.Cast(x.dtype, length)
    at = lambda i, k: x[tuple(i) + (k,)]  # noqa: E731
    if center:
        s1 = _fold(_lane_reduce(at, rows_shape, nc, lanes, "sum", "s1"), at, rows_shape, start, length, has_tail,
                   lanes, "sum", "s1")
        mean = te.compute(tuple(rows_shape), lambda *i: s1(*i) / n, name="mean")
        dev = lambda i, k: x[tuple(i) + (k,)] - mean[tuple(i)]  # noqa: E731
    else:
        mean = None
        dev = at
    sq = lambda i, k: dev(i, k) * dev(i, k)  # noqa: E731
    s2 = _fold(_lane_reduce(sq, rows_shape, nc, lanes, "sum", "s2"), sq, rows_shape, start, length, has_tail,
               lanes, "sum", "s2")
    rstd = te.compute(tuple(rows_shape), lambda *i: tirx.rsqrt(s2(*i) / n + tirx.const(eps, x.dtype)), name="rstd")

    def out(*i):
        y = dev(i[:-1], i[-1]) * rstd(*i[:-1])
        if gamma is not None:
            y = y * gamma[i[-1]]
        if beta is not None:
            y = y + beta[i[-1]]
        return y

    return te.compute(x.shape, out, name="norm")


def layer_norm_te(x, gamma, beta, eps: float, lanes: int, scale: bool, center: bool) -> te.Tensor:
    return _norm_te(x, gamma if scale else None, beta if center else None, eps, lanes, center=True)


def rms_norm_te(x, gamma, eps: float, lanes: int) -> te.Tensor:
    return _norm_te(x, gamma, None, eps, lanes, center=False)


def schedule_row_kernel(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc:
    """Rows parallel; per row: lane-partial reductions vectorised, folds scalar, the elementwise
    output vectorised over the full vectors with a scalar tail."""
    from tvm.s_tir.dlight.analysis import get_root_block

    sch = s_tir.Schedule(func)
    blocks = list(sch.get_child_blocks(get_root_block(sch)))
    out = blocks[-1]
    # elementwise intermediates (delta, exp, mean/rstd combinations) are recomputed where used
    for b in blocks[:-1]:
        if {iv.iter_type for iv in sch.get(b).iter_vars} <= {tirx.IterVar.DataPar}:
            name = sch.get(b).name_hint
            if not name.endswith("_part"):
                try:
                    sch.compute_inline(b)
                except Exception:  # noqa: BLE001 - kept as its own block (e.g. written by two readers)
                    pass
    loops = sch.get_loops(out)
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    k = sch.get_loops(out)[-1]
    blocks = list(sch.get_child_blocks(get_root_block(sch)))
    names = [sch.get(b).name_hint for b in blocks]
    for b in reversed(blocks[:-1]):
        sch.compute_at(b, row, preserve_unit_loops=True)
    parts = []
    # the lane-partial blocks: reduction loop outside, lanes inside, vectorised
    for name in names:
        if name.endswith("_part"):
            b = sch.get_sblock(name)
            lane_loop, c = sch.get_loops(b)[-2:]
            sch.reorder(c, lane_loop)
            sch.vectorize(lane_loop)
            parts.append((b, c))
    # the output: vectorised; a ragged last vector is masked (tirx.enable_buffer_level_predication)
    length = sch.get(k).extent
    if not (isinstance(length, tirx.IntImm) and int(length) < lanes):
        _, v = sch.split(k, [None, lanes])
        sch.vectorize(v)
    if not (isinstance(sch.get(row).extent, tirx.IntImm) and int(sch.get(row).extent) == 1):
        sch.parallel(row)
    for b, c in parts:
        sch.decompose_reduction(b, c)
    # the other reductions (lane folds, tails) get their init outside their loop too: a tail loop can
    # be empty (row length a multiple of lanes), and an init inside it would then never run
    for name in names:
        if name.endswith("_tail") or name.endswith("_lanes"):
            b = sch.get_sblock(name)
            sch.decompose_reduction(b, sch.get_loops(b)[-1])
    return sch.mod["main"]


def _te_shape(ty: relax.TensorType, syms: dict[str, tirx.Var]) -> list:
    """A TE placeholder shape: static dims kept, symbolic dims as variables, one per distinct expression
    (in `syms`): [B, T, T] gets one T for both axes, so the kernel's buffers match its callers' (FuseTIR
    checks that a value keeps one buffer shape)."""
    out = []
    for i, d in enumerate(ty.shape.values):
        if isinstance(d, tirx.IntImm):
            out.append(d)
            continue
        key = str(d)
        if key not in syms:
            syms[key] = tirx.Var(d.name if isinstance(d, tirx.Var) else f"n{len(syms)}", _I64)
        out.append(syms[key])
    return out


def _dims_pattern(types: list) -> str:
    """The static dims of `types` and which symbolic dims are the same expression: '[2, s0, s0]'."""
    seen: dict[str, int] = {}
    parts = []
    for t in types:
        dims = []
        for d in t.shape.values:
            if isinstance(d, tirx.IntImm):
                dims.append(str(int(d)))
            else:
                dims.append(f"s{seen.setdefault(str(d), len(seen))}")
        parts.append(f"{t.dtype}[{', '.join(dims)}]")
    return ";".join(parts)


def _kernel(name: str, build: Callable, arg_types: list, lanes: int) -> tirx.PrimFunc:
    syms: dict[str, tirx.Var] = {}
    args = [te.placeholder(_te_shape(t, syms), t.dtype, name=f"a{i}") for i, t in enumerate(arg_types)]
    out = build(*args)
    func = te.create_prim_func(args + [out])
    func = schedule_row_kernel(func, lanes)
    return func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True).with_attr("tirx.noalias", True)


def applies(ty: Any) -> bool:
    """Whether the row kernels take a tensor of relax type `ty` (float32, known rank >= 2)."""
    return getattr(ty, "dtype", None) == "float32" and getattr(ty, "shape", None) is not None \
        and hasattr(ty.shape, "values") and ty.ndim >= 2


def emit_softmax_empty_rows_zero(bb: Any, kernels: dict, x: relax.Expr, lanes: int) -> relax.Expr:
    """Emit softmax over x's last axis (float32, CPU) that gives zeros for a row of only -inf: one row
    kernel, where the portable form (a clamp, a softmax, and a multiply by a "row seen" reduction)
    takes an extra pass over the scores."""
    ty = x.ty
    key = ("softmax_empty_rows_zero", _dims_pattern([ty]), lanes)
    if key not in kernels:
        kernels[key] = bb.add_func(_kernel("softmax_rows_masked", lambda a: softmax_te(a, lanes, True), [ty], lanes),
                                   "softmax_rows_masked")
    return bb.emit(relax.call_tir(kernels[key], [x], out_ty=relax.TensorType(ty.shape, ty.dtype)))


@tvm.transform.module_pass(opt_level=0, name="SpeccCPURowKernels")
class CPURowKernels:
    """Replace softmax / layer_norm / rms_norm over the last axis (float32) by the vectorised row kernels."""

    def __init__(self, lanes: int = 16):
        self.lanes = lanes

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        from tvm.relax import PyExprMutator, expr_functor

        lanes = self.lanes
        cache: dict[str, tvm.ir.GlobalVar] = {}

        @expr_functor.mutator
        class Rewriter(PyExprMutator):
            def _call(self, key: str, build: Callable, args: list, out_ty) -> relax.Expr:
                types = [a.ty for a in args]
                sig = key + "|" + _dims_pattern(types)
                gv = cache.get(sig)
                if gv is None:
                    gv = self.builder_.add_func(_kernel(key, build, types, lanes), key)
                    cache[sig] = gv
                return relax.call_tir(gv, args, out_ty=out_ty)

            def visit_call_(self, call):  # noqa: N802
                call = super().visit_call_(call)
                op = getattr(call.op, "name", None)
                if op not in ("relax.nn.softmax", "relax.nn.layer_norm", "relax.nn.rms_norm"):
                    return call
                x = call.args[0]
                ty = x.ty
                if not applies(ty):
                    return call
                rank = ty.ndim
                axes = [int(call.attrs.axis)] if op == "relax.nn.softmax" else [int(a) for a in call.attrs.axes]
                if [a % rank for a in axes] != [rank - 1]:
                    return call
                out_ty = relax.TensorType(ty.shape, ty.dtype)
                if op == "relax.nn.softmax":
                    return self._call("softmax_rows", lambda a: softmax_te(a, lanes), [x], out_ty)
                eps = float(call.attrs.epsilon)
                if op == "relax.nn.rms_norm":
                    return self._call(f"rms_norm_rows_{eps:g}", lambda a, g: rms_norm_te(a, g, eps, lanes),
                                      [x, call.args[1]], out_ty)
                scale, center = bool(call.attrs.scale), bool(call.attrs.center)
                return self._call(f"layer_norm_rows_{eps:g}_{int(scale)}{int(center)}",
                                  lambda a, g, b: layer_norm_te(a, g, b, eps, lanes, scale, center),
                                  [x, call.args[1], call.args[2]], out_ty)

        rw = Rewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        return rw.builder_.get()


__all__ = ["CPURowKernels", "applies", "emit_softmax_empty_rows_zero", "softmax_te", "layer_norm_te", "rms_norm_te", "schedule_row_kernel"]
