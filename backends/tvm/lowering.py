"""TVM lowerings, keyed by op name: how each IR op is written in Relax.

The IR is lowered straight to Relax with a `relax.BlockBuilder` (no torch.export, no torch frontend):

* graph inputs become the first parameters of the Relax function `main`; the symbolic dimensions
  of the spec (B, T, ...) become `tirx.Var`s in their shapes, so one compiled library serves
  every batch size and length;
* every parameter of the graph (in the order of `init_weights`, tied parameters once, at their
  owner) becomes a further parameter of `main`, after the data inputs, named as in
  weights.safetensors;
* each node is lowered by `LOWERINGS[node.op](ctx, inputs)`, which returns a Relax expression (or
  a tuple of them for an op with several outputs, e.g. split).

The LSTM and GRU recurrences are one hand-written TIR kernel, parameterised by the cell (on CPU: the
batch rows in parallel, each a serial loop over the symbolic time dimension, gates vectorised, the
state kept in the output and scratch buffers), called with `call_tir` once per layer and direction;
the input projection of all steps is one Relax matmul before it. No unrolling: T stays symbolic. CUDA
has its own version of that kernel (a thread block per batch row), compiled but not yet run on a GPU.

On CPU targets `linear` is written as matmul(x, permute_dims(W)): the schedules vectorise over the
output columns, so they read W transposed ([in, out], contiguous along the columns); with
LiftTransformParams (the default) the transpose runs once, when the weights are bound.

On CPU targets conv1d/conv2d are one kernel each, implicit GEMM: a matmul of the weights with the
window taps of the (zero-padded) input, gathered as the CPU Matmul schedule packs its panels; a
grouped conv is an im2col gather kernel and one grouped matmul. On GPUs they are Relax's conv ops. Attention (the layer and `attend`) without a mask or prefix
is, on CPU targets, one hand-written kernel (backends/tvm/kernels.py: every batch row and head in
parallel, the heads read in place from the projections, no score matrix in memory); otherwise it is
written out as backends/pytorch's MultiHeadAttention.attend: masks, prefixes and keys whose batch
dimensions broadcast included. Ops with a recipe of their own: integer pow (through float64), moe_mlp (every expert on every
token, then each token's own expert gathered), rot90 (flips and a transpose, as torch.rot90).

Ops this backend cannot lower are listed in UNSUPPORTED (a test checks every registered op is in
one table or the other).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax import op as R

from specc.backends.tvm import rowops
from specc.backends.tvm.kernels import fused_attention, gate_fns
from specc.backends.tvm.schedules import BATCH_MARK, GATHER_MARK
from specc.compiler.dims import Dim, Sym, evaluate, product, solve_all, symbol_name
from specc.compiler.ir import DTYPES, Graph, Node, ParamSpec, Ref, TensorType, slice_step


class LoweringError(Exception):
    """The graph uses something this backend cannot lower (yet). `span`: where in the spec, when known."""

    def __init__(self, message: str, span: Any = None):
        super().__init__(message)
        self.span = span


# ---------------------------------------------------------------------------------------------
# what a lowering sees
# ---------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    bb: relax.BlockBuilder
    graph: Graph
    nid: int
    node: Node
    syms: dict[str, tirx.Var]
    weights: dict[str, relax.Var]
    target_kind: str = "llvm"
    kernels: dict[Any, tvm.ir.GlobalVar] = field(default_factory=dict)  # cache of TIR kernels by key
    lanes: int = 16  # float32 lanes of the CPU target's vectors (hand-written kernels' register tiles)

    # -- attributes and types -------------------------------------------------------------
    def a(self, key: str, default: Any = None) -> Any:
        return self.node.attr(key, default)

    @property
    def out(self) -> TensorType:
        return self.node.outputs[0]

    def in_type(self, i: int) -> TensorType:
        return self.graph.type_of(self.node.inputs[i])

    @property
    def dtype(self) -> str:
        return DTYPES[self.out.dtype]

    def dim(self, d: Dim) -> Any:
        return dim_expr(d, self.syms)

    def shape(self, dims: Sequence[Dim]) -> list:
        return [self.dim(d) for d in dims]

    # -- parameters ----------------------------------------------------------------------
    def weight(self, local: str) -> relax.Var:
        """The Relax parameter holding this node's parameter `local` (its owner's when tied)."""
        for p in self.node.params:
            if p.name == local:
                full = p.tied_to or ".".join(self.node.path + (p.name,))
                return self.weights[full]
        raise LoweringError(f"{self.node.op}: node has no parameter '{local}'")

    def has_weight(self, local: str) -> bool:
        return any(p.name == local for p in self.node.params)

    # -- emitting ------------------------------------------------------------------------
    def emit(self, expr: relax.Expr, hint: str = "") -> relax.Var:
        return self.bb.emit(expr, hint)

    def const(self, value: Any, dtype: str | None = None) -> tvm.ir.expr.Constant:
        return relax.const(value, dtype or self.dtype)


def dim_expr(d: Dim, syms: dict[str, tirx.Var]) -> Any:
    """A dimension (int or polynomial over symbols) as a TIR int64 expression."""
    if isinstance(d, bool):
        raise LoweringError(f"not a dimension: {d!r}")
    if isinstance(d, int):
        return tirx.IntImm("int64", d)
    total = None
    for mono, coef in d.terms:
        term = tirx.IntImm("int64", coef)
        for s in mono:
            if s not in syms:
                raise LoweringError(f"symbolic dimension {s} is not readable from the graph inputs")
            term = term * syms[s]
        total = term if total is None else total + term
    return total


def tensor_type(t: TensorType, syms: dict[str, tirx.Var]) -> relax.TensorType:
    return relax.TensorType([dim_expr(d, syms) for d in t.shape], DTYPES[t.dtype])


Lowering = Callable[[Ctx, list], Any]


# ---------------------------------------------------------------------------------------------
# helpers shared by lowerings
# ---------------------------------------------------------------------------------------------

def _cast(c: Ctx, x: relax.Expr, dtype: str) -> relax.Expr:
    """x converted to `dtype` (a Relax dtype string); a constant is rebuilt rather than cast."""
    if x.ty.dtype == dtype:
        return x
    if isinstance(x, tvm.ir.expr.Constant):
        value = x.data.numpy() if hasattr(x, "data") else np.asarray(x.value.numpy() if hasattr(x.value, "numpy")
                                                                     else x.value)
        return relax.const(value.astype(_np_dtype(dtype)), dtype)
    return c.emit(R.astype(x, dtype))


def _lowest(dtype: str) -> float:
    """The lowest finite value of a float dtype (bfloat16 through ml_dtypes, which numpy's finfo refuses)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).min)
    return float(np.finfo(np.dtype(dtype)).min)


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
        return np.dtype("bfloat16")
    return np.dtype(dtype)


def _te_linear(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """x [..., K] . w [N, K] -> [..., N]: the reduction runs along contiguous rows of x and of w."""
    k = te.reduce_axis((0, w.shape[1]), name="k")
    return te.compute(tuple(x.shape[:-1]) + (w.shape[0],),
                      lambda *i: te.sum(x[i[:-1] + (k,)] * w[i[-1], k], axis=k), name="linear")


#: How `linear` (and the projections inside attention, mlp, lstm) are written: "te" computes x W^T with a
#: TE kernel reading W as stored ([out, in]); "matmul" is Relax's matmul(x, permute_dims(W)); "auto" is
#: "matmul" for CPU targets (W^T, [in, out], is what the CPU schedules read: contiguous along the output
#: columns they vectorise; with lifting, the transpose runs once, at bind time) and "te" for GPUs.
LINEAR_IMPL = "auto"


def _linear(c: Ctx, x: relax.Expr, w: relax.Expr, b: relax.Expr | None, hint: str = "") -> relax.Expr:
    """y = x W^T + b over the last dimension."""
    impl = LINEAR_IMPL if LINEAR_IMPL != "auto" else ("matmul" if c.target_kind == "llvm" else "te")
    if impl == "te":
        y = c.bb.emit_te(_te_linear, x, w, primfunc_name_hint="linear")
    else:
        y = c.emit(R.matmul(x, c.emit(R.permute_dims(w, [1, 0]))), hint)
    return c.emit(R.add(y, b)) if b is not None else y


def _act(c: Ctx, name: str, x: relax.Expr) -> relax.Expr:
    """mlp's and moe_mlp's `act`: the lowering of the op of that name at its default arguments (ACTIVATIONS,
    beside those lowerings), so that nan and inf come out as the op alone gives them."""
    if name == "identity":
        return x
    if name == "relu":
        return _relu(c, x)
    return c.emit(ACTIVATIONS[name](c, x))


def _axis(a: int, rank: int) -> int:
    return a % rank if rank else 0


# ---------------------------------------------------------------------------------------------
# lowerings
# ---------------------------------------------------------------------------------------------

def _input(c: Ctx, xs: list) -> relax.Expr:  # pragma: no cover - inputs are bound by the driver
    raise LoweringError("input nodes are bound to function parameters by the driver")


def _scalar(c: Ctx, xs: list) -> relax.Expr:
    return relax.const(c.a("value"), DTYPES[c.a("dtype")])


def _arange(c: Ctx, xs: list) -> relax.Expr:
    return R.arange(0, c.dim(c.a("n")), 1, dtype=DTYPES[c.a("dtype")])


def _cast_op(c: Ctx, xs: list) -> relax.Expr:
    return _cast(c, xs[0], DTYPES[c.a("dtype")])


def _unary(fn: Callable[[relax.Expr], relax.Expr]) -> Lowering:
    return lambda c, xs: fn(xs[0])


def _gelu(c: Ctx, xs: list) -> relax.Expr:
    return R.nn.gelu_tanh(xs[0]) if c.a("approximate") == "tanh" else R.nn.gelu(xs[0])


def _pow(c: Ctx, xs: list) -> relax.Expr:
    """x ** y; integers (Relax's power takes floats only) through float64, which holds every i32 power
    exactly and i64 ones up to 2**53, rounded back."""
    if c.out.dtype in ("f16", "bf16", "f32", "f64"):
        return R.power(_cast(c, xs[0], c.dtype), _cast(c, xs[1], c.dtype))
    y = c.emit(R.power(_cast(c, xs[0], "float64"), _cast(c, xs[1], "float64")))
    return R.astype(c.emit(R.round(y)), c.dtype)


# -- division: constant zeros (TIR's constant folder refuses a division by 0 and folds y * 0 to 0) ------

def _const_array(x: tvm.ir.expr.Constant) -> np.ndarray:
    return x.data.numpy() if hasattr(x, "data") else np.asarray(x.value.numpy() if hasattr(x.value, "numpy")
                                                                 else x.value)


def _zero_constant(x: relax.Expr) -> bool:
    """Whether x is a constant every element of which is 0 (or -0.0)."""
    return isinstance(x, tvm.ir.expr.Constant) and not np.any(_const_array(x))


def _opaque_zero(c: Ctx, x: relax.Expr) -> relax.Expr:
    """A scalar constant 0 as a [1, ..., 1] constant of the result's rank: a buffer the kernel reads rather
    than the immediate legalisation would make of it, which TIR folds (y * 0 -> 0, 0 / y -> 0, where
    torch's IEEE arithmetic gives nan for an inf or nan y, -0.0 for a negative y, nan for 0 / 0). x as it
    is otherwise."""
    if not _zero_constant(x) or x.ty.ndim != 0 or c.out.rank == 0:
        return x
    return relax.const(np.full((1,) * c.out.rank, _const_array(x)), x.ty.dtype)


def _mul(c: Ctx, xs: list) -> relax.Expr:
    return R.multiply(*(_opaque_zero(c, _cast(c, x, c.dtype)) for x in xs))


def _additive(fn: Callable[[relax.Expr, relax.Expr], relax.Expr]) -> Lowering:
    """add / sub, a literal 0 of floats read from a buffer: TIR folds y + 0 to y and 0 - y to -y, where IEEE
    gives +0.0 for -0.0 + 0 and 0 - 0.0 (the passes keep such sums for the same reason)."""

    def lower(c: Ctx, xs: list) -> relax.Expr:
        ys = [_cast(c, x, c.dtype) for x in xs]
        return fn(*(_opaque_zero(c, y) for y in ys) if c.out.dtype in _FLOATS else ys)

    return lower


#: Ops whose kernels fusion inlines into a consumer, elementwise or moving elements: TIR's simplifier sees
#: through them to their inputs. A value of any other op (inputs, layers, reductions, matmul) is opaque to it.
_INLINED = frozenset({"scalar", "zeros", "ones", "arange", "cast", "neg", "abs", "relu", "exp", "log", "sqrt",
                      "sin", "cos", "rsqrt", "erf", "floor", "ceil", "round", "sign", "softplus", "leaky_relu",
                      "elu", "hardswish", "mish",
                      "tanh", "sigmoid", "silu", "gelu", "add", "sub", "mul", "div", "pow", "floordiv", "mod",
                      "maximum", "minimum", "clamp", "expand", "reshape", "unsqueeze", "transpose", "permute",
                      "getitem", "concat", "stack", "flip", "where",
                      "masked_fill", "tril", "triu", "detach", "grad_reverse", "dropout"})
_CONSTANT = frozenset({"scalar", "zeros", "ones", "arange"})


def _may_fold(graph: Graph, ref: Ref) -> bool:
    """Whether TIR's simplifier may fold the value `ref`, inlined into its consumer, to a constant (0 as a
    divisor, which it refuses): its expression, through inlined ops, reads a zeros(...), more than one
    constant (ones(...) - 1), some opaque value more than once (z - z, ones * z - z), or nothing opaque at
    all (arange(1)). Else (x / (y + 1), x / sqrt(v + eps), x / sum(e)) no constant can arise."""
    constants, opaque, stack = 0, set(), [ref]
    while stack:
        r = stack.pop()
        node = graph.node(r.node)
        if node.op not in _INLINED or node.params:
            if r in opaque:
                return True
            opaque.add(r)
            continue
        if node.op == "zeros":
            return True
        if node.op in _CONSTANT:
            constants += 1
            if constants > 1:
                return True
        stack.extend(node.inputs)
        if len(stack) > 10_000:  # a huge expression: take no chance
            return True
    return not opaque


_BITS_OF = {"float16": "int16", "bfloat16": "int16", "float32": "int32", "float64": "int64"}


def _unfolded(v: Any, dtype: str) -> Any:
    """v itself, through a bit cast and back that TIR's simplifier does not look through: a divisor that
    fusion turns into a constant 0 stays a value (LLVM divides by it as IEEE says, and drops the casts)."""
    return tirx.reinterpret(dtype, tirx.reinterpret(_BITS_OF[dtype], v))


def _elementwise_te(c: Ctx, fn: Callable[[Any, Any, str], Any], xs: list, name: str) -> relax.Expr:
    """fn(x, y, dtype) per element as one TE kernel, x and y broadcast to the result's shape first."""
    shape = c.shape(c.out.shape)
    xs = [x if tuple(c.in_type(i).shape) == tuple(c.out.shape) else c.emit(R.broadcast_to(x, shape))
          for i, x in enumerate(xs)]
    dtype = c.dtype

    def kernel(a: te.Tensor, b: te.Tensor) -> te.Tensor:
        return te.compute(a.shape, lambda *i: fn(a(*i), b(*i), dtype), name=f"T_{name}")

    return c.bb.emit_te(kernel, *xs, primfunc_name_hint=name)


def _divide(c: Ctx, xs: list) -> relax.Expr:
    """x / y. By a constant 0 (or -0.0): x times the constant 1 / y (+-inf), which is what IEEE division
    gives (+-inf, nan for 0 / 0), exactly; by a value TIR's simplifier might fold to 0 once fused (see
    `_may_fold`): a kernel whose divisor it cannot fold. Other divisions are Relax's divide."""
    x, y = (_cast(c, v, c.dtype) for v in xs)
    if _zero_constant(y):
        with np.errstate(divide="ignore"):
            inv = np.divide(np.ones((), _const_array(y).dtype), _const_array(y))
        return R.multiply(_opaque_zero(c, x), relax.const(inv, c.dtype))
    if _may_fold(c.graph, c.node.inputs[1]):
        return _elementwise_te(c, lambda a, b, dt: a / _unfolded(b, dt), [x, y], "divide")
    return R.divide(_opaque_zero(c, x), y)


def _float_remainder(a: Any, b: Any, dtype: str) -> Any:
    """torch.remainder on floats: fmod(a, b), plus b where it is nonzero and its sign is not b's."""
    b = _unfolded(b, dtype)
    zero = tirx.const(0, dtype)
    m = tirx.truncmod(a, b)  # fmod: LLVM's frem
    # (TIR's != on floats is an ordered compare, false for nan: the tests are written with < and >)
    return tirx.Select(tirx.Or(tirx.And(m > zero, b < zero), tirx.And(m < zero, b >= zero)), m + b, m)


def _float_floor_divide(a: Any, b: Any, dtype: str) -> Any:
    """torch's floor division on floats (c10's div_floor_floating, as Python's float //): (a - fmod(a, b)) / b,
    less 1 where the remainder's sign is not b's, rounded to the nearest integer; a / b when b is 0."""
    b = _unfolded(b, dtype)
    zero, one = tirx.const(0, dtype), tirx.const(1, dtype)
    q = a / b
    m = tirx.truncmod(a, b)
    d = (a - m) / b
    d = tirx.Select(tirx.Or(tirx.And(m > zero, b < zero), tirx.And(m < zero, b >= zero)), d - one, d)
    fl = tirx.floor(d)
    fl = tirx.Select(d - fl > tirx.const(0.5, dtype), fl + one, fl)
    return tirx.Select(b == zero, q, tirx.Select(d == zero, tirx.copysign(zero, q), fl))


def _floor_op(name: str) -> Lowering:
    """x // y (floordiv) and x % y (mod), as torch computes them: on integers TIR's floordiv / floormod
    (Python's rounding: toward -inf, the remainder with the divisor's sign), a divisor that is 0 at run
    time torch's RuntimeError("ZeroDivisionError") on CPU targets (`_checked_divisor`), taken as 1 on
    GPUs (a kernel cannot raise there); a constant 0 is an error at spec time;
    on floats a kernel of torch's own formula (not TVM's floor(x / y), which rounds differently)."""

    def lower(c: Ctx, xs: list) -> relax.Expr:
        x, y = (_cast(c, v, c.dtype) for v in xs)
        if c.out.dtype in ("f16", "bf16", "f32", "f64"):
            fn = _float_floor_divide if name == "floordiv" else _float_remainder
            return _elementwise_te(c, fn, [x, y], "floor_divide" if name == "floordiv" else "remainder")
        if not (isinstance(y, tvm.ir.expr.Constant) and np.all(_const_array(y))):
            if c.target_kind == "llvm":
                y = _checked_divisor(c, y, name)
            else:  # a GPU kernel cannot raise: a 0 divides as 1
                zero, one = relax.const(0, c.dtype), relax.const(1, c.dtype)
                y = c.emit(R.where(c.emit(R.equal(y, zero)), one, y))
        return (R.floor_divide if name == "floordiv" else R.floor_mod)(x, y)

    return lower


def nonzero_kernel(dtype: str, message: str) -> tirx.PrimFunc:
    """A copy of the flat integer tensor a [n] into b that stops the call with RuntimeError(message) at
    the first 0 (a TIR assert: host code, so CPU targets only)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def nonzero(var_a: T.handle, var_b: T.handle):
        # (opaque, and a root block: the single-input single-output kernel is not taken for a reshape)
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        a = T.match_buffer(var_a, (n,), dtype)
        b = T.match_buffer(var_b, (n,), dtype)
        with T.sblock("root"):
            for i in range(n):
                assert a[i] != T.Cast(dtype, 0), message
                b[i] = a[i]

    return nonzero


def _checked_divisor(c: Ctx, y: relax.Expr, name: str) -> relax.Expr:
    """The integer divisor y, through a kernel that raises torch's ZeroDivisionError (a RuntimeError,
    naming the spec's line and column) where y holds a 0: an integer division by 0 traps."""
    span = c.node.span
    where = f" ('{'//' if name == 'floordiv' else '%'}' at line {span.line}, column {span.col} of the spec)" \
        if span is not None else ""
    message = "ZeroDivisionError" + where
    key = ("nonzero", c.dtype, message)
    if key not in c.kernels:
        c.kernels[key] = c.bb.add_func(nonzero_kernel(c.dtype, message), "nonzero")
    shape = c.shape(c.in_type(1).shape)
    n = c.dim(product(c.in_type(1).shape)) if shape else 1
    flat = c.emit(R.reshape(y, [n]))
    checked = c.emit(relax.call_tir(c.kernels[key], [flat], relax.TensorType([n], c.dtype)))
    return c.emit(R.reshape(checked, shape))


# -- maximum, minimum, clamp, relu, amax, amin: a nan propagates, as in torch ------------------------
# (TIR's max(a, b) is `a >= b ? a : b`: a nan a gives b; Relax's maximum, relu, clip and max reduction
# would drop a nan that torch keeps.)

_FLOATS = ("f16", "bf16", "f32", "f64")
#: The half-precision Relax dtypes: their sums (sum, mean, cumsum) and softplus compute in float32, as torch's.
_HALF = ("float16", "bfloat16")

#: How max pools, amax/amin and argmax keep a nan as torch does: "auto" is "kernel" on CPU targets (one TE
#: reduction whose combiner keeps a nan) and "portable" on GPUs (dlight's reduction rules take only the
#: standard combiners: Relax's reduction, beside the same reduction of isnan(x) that says where to put
#: nan); "drop" is Relax's reduction alone, which may lose a nan (the benchmark's `nan_dropping` variant,
#: to measure what keeping costs; relu then drops it too).
NAN = "auto"


def _nan_mode(c: Ctx) -> str:
    return NAN if NAN != "auto" else ("kernel" if c.target_kind == "llvm" else "portable")


def _isnan(c: Ctx, x: relax.Expr) -> relax.Expr:
    """R.isnan(x); of bfloat16 through float32 (TIR's isnan takes no bfloat16; the cast keeps a nan)."""
    if x.ty.dtype == "bfloat16":
        x = c.emit(R.astype(x, "float32"))
    return R.isnan(x)


def _tir_isnan(v: Any) -> Any:
    """tirx.isnan(v); of bfloat16 through float32 (as _isnan)."""
    return tirx.isnan(tirx.Cast("float32", v) if str(v.ty) == "bfloat16" else v)


def _nan_where(c: Ctx, nan_seen: relax.Expr, y: relax.Expr) -> relax.Expr:
    """y, with nan where the (0 or 1) float nan_seen is 1."""
    return R.where(c.emit(R.greater(nan_seen, c.const(0.0))), c.const(float("nan")), y)


def _scalar_of(x: relax.Expr) -> float | int | None:
    """The value of a 0-d constant, None for anything else."""
    if isinstance(x, tvm.ir.expr.Constant) and x.ty.ndim == 0:
        return _const_array(x).item()
    return None


def _nan_pick(name: str, a: Any, b: Any) -> Any:
    """max(a, b) or min(a, b) of two float TIR values, nan where either is nan."""
    m = tirx.max(a, b) if name == "maximum" else tirx.min(a, b)
    return tirx.Select(_tir_isnan(a), a, tirx.Select(_tir_isnan(b), b, m))


def _keep_nan(c: Ctx, x: relax.Expr, y: relax.Expr) -> relax.Expr:
    """y, or x where x is nan: Relax ops, which fuse into one kernel with the computation of y (and are
    legalised at the static sizes of a tuned copy)."""
    return R.where(c.emit(_isnan(c, x)), x, c.emit(y))


def _extremum(name: str) -> Lowering:
    """maximum / minimum: Relax's, and for floats a nan of either side kept (a scalar constant side is
    not nan)."""
    fn = R.maximum if name == "maximum" else R.minimum

    def lower(c: Ctx, xs: list) -> relax.Expr:
        x, y = (_cast(c, v, c.dtype) for v in xs)
        if c.out.dtype not in _FLOATS:
            return fn(x, y)
        if _scalar_of(x) is not None:
            x, y = y, x
        if _scalar_of(y) is not None:
            return _keep_nan(c, x, fn(x, y))
        return _keep_nan(c, x, _keep_nan(c, y, fn(x, y)))

    return lower


def _clamp(c: Ctx, xs: list) -> relax.Expr:
    """torch.clamp: x limited to [min, max] (either absent: no limit); a nan stays nan."""
    lo, hi = c.a("min"), c.a("max")
    x = _cast(c, xs[0], c.dtype)
    y = x
    if lo is not None:
        y = c.emit(R.maximum(y, c.const(float(lo) if c.out.dtype in _FLOATS else int(lo))))
    if hi is not None:
        y = c.emit(R.minimum(y, c.const(float(hi) if c.out.dtype in _FLOATS else int(hi))))
    return _keep_nan(c, x, y) if c.out.dtype in _FLOATS else y


def _relu(c: Ctx, x: relax.Expr) -> relax.Expr:
    """max(x, 0), nan where x is nan (torch's relu); Relax's relu for integers."""
    if x.ty.dtype not in ("float16", "bfloat16", "float32", "float64") or _nan_mode(c) == "drop":
        return c.emit(R.nn.relu(x))
    return c.emit(_keep_nan(c, x, R.nn.relu(x)))


def _sign(c: Ctx, xs: list) -> relax.Expr:
    """1 where x > 0, -1 where x < 0, else 0 (0 for +-0 and nan, as torch.sign)."""
    one, zero = c.const(1.0), c.const(0.0)
    neg = c.emit(R.where(c.emit(R.less(xs[0], zero)), c.const(-1.0), zero))
    return R.where(c.emit(R.greater(xs[0], zero)), one, neg)


def _tanh(c: Ctx, x: relax.Expr) -> relax.Expr:
    """tanh(x); in float64, x - x^3/3 + 2x^5/15 - 17x^7/315 where |x| < 0.01 (TVM's float64 tanh, (e^2x - 1) /
    (e^2x + 1), loses its relative precision near 0: 2e-5 at x = 1e-12; the series is within 3e-18 relative)."""
    if x.ty.dtype != "float64":
        return R.tanh(x)
    x2 = c.emit(R.multiply(x, x))
    poly = c.const(-17.0 / 315.0)
    for coef in (2.0 / 15.0, -1.0 / 3.0, 1.0):  # Horner: 1 + x2 (-1/3 + x2 (2/15 - 17/315 x2))
        poly = c.emit(R.add(c.const(coef), c.emit(R.multiply(x2, poly))))
    series = c.emit(R.multiply(x, poly))
    small = c.emit(R.less(c.emit(R.abs(x)), c.const(1e-2)))
    return R.where(small, series, c.emit(R.tanh(x)))


def _softplus(c: Ctx, x: relax.Expr, beta: float = 1.0, threshold: float = 20.0) -> relax.Expr:
    """x where beta * x > threshold, else log1p(exp(beta * x)) / beta, as torch computes it (Relax's softplus
    takes log(1 + exp(..)), which is 0 below x = -17 in float32 where torch gives exp(x)); float16 and
    bfloat16 through float32. A nan stays nan (the compare is false)."""
    dtype = x.ty.dtype
    if dtype in _HALF:
        x = c.emit(R.astype(x, "float32"))

    def kernel(a: te.Tensor) -> te.Tensor:
        def at(*i: Any) -> Any:
            v = a[i]
            bx = v * tirx.const(beta, a.dtype)
            return tirx.Select(bx > tirx.const(threshold, a.dtype), v,
                               tirx.log1p(tirx.exp(bx)) / tirx.const(beta, a.dtype))

        return te.compute(a.shape, at, name="T_softplus")

    y = c.bb.emit_te(kernel, x, primfunc_name_hint="softplus")
    return R.astype(y, dtype) if dtype in _HALF else y


def _leaky_relu(c: Ctx, x: relax.Expr, negative_slope: float = 0.01) -> relax.Expr:
    return R.nn.leakyrelu(x, alpha=negative_slope)


def _elu(c: Ctx, x: relax.Expr, alpha: float = 1.0) -> relax.Expr:
    """x where x > 0, else alpha * (exp(x) - 1) (a nan stays nan: the compare is false); of a zero,
    alpha * x, the sign torch's alpha * expm1(x) gives it (exp(x) - 1 is +0 for -0 too)."""
    em1 = c.emit(R.subtract(c.emit(R.exp(x)), c.const(1.0)))
    em1 = c.emit(R.where(c.emit(R.equal(x, c.const(0.0))), x, em1))
    below = c.emit(R.multiply(c.const(alpha), em1))
    return R.where(c.emit(R.greater(x, c.const(0.0))), x, below)


def _hardswish(c: Ctx, x: relax.Expr) -> relax.Expr:
    """x * min(max(x + 3, 0), 6) / 6 (a nan x gives nan through the product)."""
    r6 = c.emit(R.minimum(c.emit(R.maximum(c.emit(R.add(x, c.const(3.0))), c.const(0.0))), c.const(6.0)))
    return R.divide(c.emit(R.multiply(x, r6)), c.const(6.0))


def _mish(c: Ctx, x: relax.Expr) -> relax.Expr:
    return R.multiply(x, c.emit(_tanh(c, c.emit(_softplus(c, x)))))


#: The activations of mlp and moe_mlp other than relu and identity (see _act), at their ops' default
#: arguments: the ops' own lowerings.
ACTIVATIONS: dict[str, Callable[[Ctx, relax.Expr], relax.Expr]] = {
    "gelu": lambda c, x: R.nn.gelu(x),
    "silu": lambda c, x: R.nn.silu(x),
    "tanh": _tanh,
    "sigmoid": lambda c, x: R.sigmoid(x),
    "softplus": _softplus,
    "leaky_relu": _leaky_relu,
    "elu": _elu,
    "hardswish": _hardswish,
    "mish": _mish,
}


def _relu_op(c: Ctx, xs: list) -> relax.Expr:
    return _relu(c, xs[0])


def _nan_reducer(pick: str) -> Any:
    """A TE max (pick 'maximum') or min reduction that gives nan where any value reduced is nan."""
    return te.comm_reducer(lambda a, b: _nan_pick(pick, a, b),
                           lambda t: tirx.const(float("-inf") if pick == "maximum" else float("inf"), t),
                           name=f"nan_{pick}")


def _nan_reduce(name: str) -> Lowering:
    """amax / amin over some axes: Relax's for integers; for floats a reduction whose combiner keeps a nan
    (torch's amax and amin give nan for a row holding one)."""

    def lower(c: Ctx, xs: list) -> relax.Expr:
        rank = c.in_type(0).rank
        axes, keep = _axes_of(c, rank), bool(c.a("keepdim"))
        fn = R.max if name == "maximum" else R.min
        if c.out.dtype not in _FLOATS or _nan_mode(c) == "drop":
            return fn(xs[0], axis=axes, keepdims=keep)
        if _nan_mode(c) == "portable":
            seen = c.emit(R.max(c.emit(R.astype(c.emit(_isnan(c, xs[0])), c.dtype)), axis=axes, keepdims=keep))
            return _nan_where(c, seen, c.emit(fn(xs[0], axis=axes, keepdims=keep)))
        pick = "maximum" if name == "maximum" else "minimum"
        reducer = _nan_reducer(pick)

        def kernel(x: te.Tensor) -> te.Tensor:
            ks = {a: te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes}
            out_axes = [a for a in range(rank) if a not in ks or keep]
            shape = [1 if a in ks else x.shape[a] for a in out_axes]

            def at(*i: Any) -> Any:
                pos = dict(zip(out_axes, i))
                return reducer(x[tuple(ks[a] if a in ks else pos[a] for a in range(rank))],
                               axis=[ks[a] for a in axes])

            return te.compute(shape, at, name=f"T_{name}")

        return c.bb.emit_te(kernel, xs[0], primfunc_name_hint="amax" if pick == "maximum" else "amin")

    return lower


def _matmul(c: Ctx, xs: list) -> relax.Expr:
    return R.matmul(xs[0], xs[1])


def _linear_op(c: Ctx, xs: list) -> relax.Expr:
    b = c.weight("bias") if c.has_weight("bias") else None
    return _linear(c, xs[0], c.weight("weight"), b)


def _embedding(c: Ctx, xs: list) -> relax.Expr:
    # "clip": an out-of-range id cannot read outside the table (the runner checks declared ranges).
    return R.take(c.weight("weight"), xs[0], axis=0, mode="clip")


def _ones(c: Ctx, n: Dim) -> relax.Expr:
    """A norm's unit gain of width n (a symbolic width, for a norm without parameters, too)."""
    if not isinstance(n, int):
        return c.emit(R.ones(c.shape([n]), c.dtype))
    return relax.const(np.ones((n,), _np_dtype(c.dtype)), c.dtype)


def _zeros(c: Ctx, n: Dim) -> relax.Expr:
    if not isinstance(n, int):
        return c.emit(R.zeros(c.shape([n]), c.dtype))
    return relax.const(np.zeros((n,), _np_dtype(c.dtype)), c.dtype)


def _norm_axis(c: Ctx) -> int:
    """The axis a layer_norm / rms_norm normalises over (its dim=): -1 for the last one (the Relax of
    every norm without dim= stays as it was), else counted from the front."""
    rank = c.out.rank
    axis = c.a("dim", -1) % rank
    return -1 if axis == rank - 1 else axis


def _moved_last(c: Ctx, x: relax.Expr, axis: int) -> relax.Expr:
    """x with `axis` moved last (unchanged for -1). A norm over another axis than the last is the norm
    over the last axis of x moved so, moved back after (`_moved_back`): the row kernels and GPU
    schedules of the last-axis norms then serve it (topi's rms_norm misreads a non-trailing axis, and
    dlight's GPU reduction rule cannot schedule a mean over a middle axis with its elementwise ops)."""
    if axis == -1:
        return x
    rank = c.out.rank
    return c.emit(R.permute_dims(x, [i for i in range(rank) if i != axis] + [axis]))


def _moved_back(c: Ctx, y: relax.Expr, axis: int) -> relax.Expr:
    """The inverse of `_moved_last`: the last axis of y back to `axis`."""
    if axis == -1:
        return y
    rank = c.out.rank
    return R.permute_dims(c.emit(y), list(range(axis)) + [rank - 1] + list(range(axis, rank - 1)))


def _normalised(c: Ctx, x: relax.Expr, centre: bool) -> relax.Expr:
    """(x - mean) / sqrt(var + eps) (centre) or x / sqrt(mean(x^2) + eps) over the last dimension, in x's
    dtype, from elementwise ops and means: the norms of dtypes Relax's fused norm ops do not take
    (layer_norm: float32 and float16 only) or compute less exactly than torch (rms_norm in float64)."""
    if centre:
        x = c.emit(R.subtract(x, c.emit(R.mean(x, axis=[-1], keepdims=True))))
    square = c.emit(R.mean(c.emit(R.multiply(x, x)), axis=[-1], keepdims=True))
    return R.multiply(x, c.emit(R.rsqrt(c.emit(R.add(square, c.const(float(c.a("eps"))))))))


def _layer_norm(c: Ctx, xs: list) -> relax.Expr:
    axis = _norm_axis(c)
    return _moved_back(c, _layer_norm_last(c, _moved_last(c, xs[0], axis), c.out.shape[axis]), axis)


def _layer_norm_last(c: Ctx, x: relax.Expr, d) -> relax.Expr:
    """layer_norm over the last axis of x, of size d."""
    affine = bool(c.a("affine"))
    with_bias = affine and c.a("bias", True) and c.has_weight("bias")
    if c.dtype not in ("float32", "float16"):
        y = _normalised(c, x, centre=True)
        if affine:
            y = R.multiply(c.emit(y), c.weight("weight"))
        return R.add(c.emit(y), c.weight("bias")) if with_bias else y
    gamma = c.weight("weight") if affine else _ones(c, d)
    beta = c.weight("bias") if with_bias else _zeros(c, d)
    return R.nn.layer_norm(x, gamma, beta, axes=[-1], epsilon=float(c.a("eps")), center=with_bias,
                           scale=affine)


def _rms_norm(c: Ctx, xs: list) -> relax.Expr:
    axis = _norm_axis(c)
    x, d = _moved_last(c, xs[0], axis), c.out.shape[axis]
    if c.dtype == "float64":
        y = _normalised(c, x, centre=False)
        y = R.multiply(c.emit(y), c.weight("weight")) if c.a("affine") else y
    else:
        w = c.weight("weight") if c.a("affine") else _ones(c, d)
        y = R.nn.rms_norm(x, w, axes=[-1], epsilon=float(c.a("eps")))
    return _moved_back(c, y, axis)


def _dropout(c: Ctx, xs: list) -> relax.Expr:
    return xs[0]  # inference: the identity


def _heads(c: Ctx, t: relax.Expr, batch: list, length: Any, h: int, dh: int) -> relax.Expr:
    """[*batch, L, h * dh] -> [*batch, h, L, dh]"""
    n = len(batch)
    t = c.emit(R.reshape(t, batch + [length, tirx.IntImm("int64", h), tirx.IntImm("int64", dh)]))
    axes = list(range(n)) + [n + 1, n, n + 2]
    return c.emit(R.permute_dims(t, axes))


def _broadcast(c: Ctx, t: relax.Expr, shape: list) -> relax.Expr:
    """t broadcast to `shape` (a no-op when it has that shape already)."""
    have = [str(d) for d in t.ty.shape.values] if hasattr(t.ty.shape, "values") else None
    if have == [str(d) for d in shape]:
        return t
    return c.emit(R.broadcast_to(t, shape))


def _fused_attention_applies(c: Ctx, qt: TensorType, mask: Any, prefix: Any) -> bool:
    """Whether attention runs as kernels.attention_kernel: CPU, float32/64, no mask, no prefix."""
    return c.target_kind == "llvm" and mask is None and prefix is None and DTYPES[qt.dtype] in ("float32", "float64")


#: How a masked attention's softmax zeroes the rows that see no key: "auto" is the CPU row kernel for float32
#: on llvm (backends/tvm/rowops.py), else "portable" (a clamp, R.nn.softmax and a multiply by a row-seen
#: reduction, for every target and dtype).
MASKED_SOFTMAX = "auto"


def _attend_core(c: Ctx, q: relax.Expr, k: relax.Expr, v: relax.Expr, qt: TensorType, kt: TensorType, h: int,
                 causal: bool, mask: relax.Expr | None, mt: TensorType | None, prefix: relax.Expr | None,
                 pt: TensorType | None) -> relax.Expr:
    """softmax(q k^T / sqrt(d/h)) v per head, heads concatenated: backends/pytorch's MultiHeadAttention.attend.

    q [*batch, T, d]; k, v [..., S, d] whose batch dimensions broadcast to q's; mask bool (true = may
    attend) or float (added), broadcastable to [..., T, S] or [..., h, T, S]; prefix [..., 2, l, d]: l key
    and l value rows put before k and v, seen by every query (causal and mask apply to the S keys only).
    d is q's width: heads * head_dim (the model width unless the attention has head_dim=).
    """
    d = int(qt.shape[-1])
    dh = d // h
    i64 = lambda n: tirx.IntImm("int64", n)  # noqa: E731
    batch = c.shape(qt.shape[:-2])
    t_len, s_len = c.dim(qt.shape[-2]), c.dim(kt.shape[-2])
    nb = len(batch)
    k = _broadcast(c, k, batch + [s_len, i64(d)])
    v = _broadcast(c, v, batch + [s_len, i64(d)])
    if _fused_attention_applies(c, qt, mask, prefix):
        # CPU: one kernel for every (batch row, head), reading the heads in place (backends/tvm/kernels.py)
        return fused_attention(c.bb, c.kernels, q, k, v, batch, t_len, s_len, d, h, causal, DTYPES[qt.dtype],
                               c.lanes)
    q = _heads(c, q, batch, t_len, h, dh)
    k = _heads(c, k, batch, s_len, h, dh)
    v = _heads(c, v, batch, s_len, h, dh)
    l = 0
    if prefix is not None:  # split into heads before the concat: no reshape of the l + S axis after it
        l = int(pt.shape[-2])
        parts = c.emit(R.split(prefix, [i64(1)], axis=-3))
        pk, pv = (c.emit(R.squeeze(c.emit(relax.TupleGetItem(parts, i)), [-3])) for i in range(2))
        pk = _heads(c, _broadcast(c, pk, batch + [i64(l), i64(d)]), batch, i64(l), h, dh)
        pv = _heads(c, _broadcast(c, pv, batch + [i64(l), i64(d)]), batch, i64(l), h, dh)
        k = c.emit(R.concat([pk, k], axis=-2))  # [*batch, h, l + S, dh]
        v = c.emit(R.concat([pv, v], axis=-2))
    keys = s_len + i64(l) if l else s_len
    kT = c.emit(R.permute_dims(k, list(range(nb + 1)) + [nb + 2, nb + 1]))  # [*batch, h, dh, l + S]
    att = c.emit(R.matmul(q, kT))
    att = c.emit(R.multiply(att, c.const(1.0 / math.sqrt(dh))))
    if causal:  # key j (after the l prefix columns) is visible from query i when j - l <= i
        rows = c.emit(R.reshape(R.arange(0, t_len, 1, dtype="int64"), [t_len, i64(1)]))
        cols = c.emit(R.reshape(R.arange(0, keys, 1, dtype="int64"), [i64(1), keys]))
        keep = c.emit(R.less_equal(cols, R.add(rows, relax.const(l, "int64")) if l else rows))  # [T, l + S]
        att = c.emit(R.where(keep, att, c.const(float("-inf"))))
    if mask is not None:  # [..., T, S] for every head, or [..., h, T, S]
        dims = list(mt.shape)
        if 3 <= mt.rank < qt.rank + 1:
            mask = c.emit(R.expand_dims(mask, [-3]))
            dims = dims[:-2] + [1] + dims[-2:]
        if l:  # the prefix columns are always visible
            mask = _broadcast(c, mask, c.shape(dims[:-1]) + [s_len])
            fill = np.ones if mt.dtype == "bool" else np.zeros
            pad = c.emit(R.broadcast_to(relax.const(fill((), _np_dtype(DTYPES[mt.dtype])), DTYPES[mt.dtype]),
                                        c.shape(dims[:-1]) + [i64(l)]))
            mask = c.emit(R.concat([pad, mask], axis=-1))
        if mt.dtype == "bool":
            att = c.emit(R.where(mask, att, c.const(float("-inf"))))
        else:
            att = c.emit(R.add(att, _cast(c, mask, c.dtype)))
        # a query that sees no key (every score -inf) gets zeros, as torch's scaled_dot_product_attention
        # gives. On the CPU (float32), one row kernel does that (rowops). Elsewhere `seen` is 1 where a row
        # has a score above -inf, else 0 (a float, not a bool tensor: dlight's CUDA code for a vectorised
        # bool load did not compile); the scores are clamped to the lowest finite value first, so that such
        # a row's softmax is finite, and its output is multiplied by `seen`. (A score of exactly the lowest
        # finite value, the Hugging Face mask convention, is seen, as in torch.)
        if MASKED_SOFTMAX == "auto" and c.target_kind == "llvm" and rowops.applies(att.ty):
            y = c.emit(R.matmul(rowops.emit_softmax_empty_rows_zero(c.bb, c.kernels, att, c.lanes), v))
        else:
            seen = c.emit(R.max(c.emit(R.astype(R.greater(att, c.const(float("-inf"))), c.dtype)), axis=-1,
                                keepdims=True))
            att = c.emit(R.maximum(att, c.const(_lowest(c.dtype))))
            y = c.emit(R.multiply(c.emit(R.matmul(c.emit(R.nn.softmax(att, axis=-1)), v)), seen))
    else:
        y = c.emit(R.matmul(c.emit(R.nn.softmax(att, axis=-1)), v))
    y = c.emit(R.permute_dims(y, list(range(nb)) + [nb + 1, nb, nb + 2]))
    return c.emit(R.reshape(y, batch + [t_len, i64(d)]))


def _rope(c: Ctx, x: relax.Expr, t_len: Any, h: int, dh: int, r: int, base: float, blocks: tuple[bool, ...]) -> relax.Expr:
    """Rotary embedding of projected heads, as backends/pytorch's MultiHeadAttention.rotate, in place in
    the [*batch, T, w] layout: x is len(blocks) column blocks of h heads of dh channels (q; k; or the fused
    q, k, v), the blocks marked True rotated on the first r channels of each head ("rotate half": channel
    j < r/2 pairs with j + r/2, turning by the angle p * base ** (-2j / r) at position p = 0..T-1).

    y = x * cos(p f) + x[perm] * sign * sin(p f), f, perm and sign constant [w] vectors (f = 0, sign = 0
    on the channels that do not turn), the angle table [T, w] from the runtime length T."""
    adt = "float64" if c.dtype == "float64" else "float32"
    inv = 1.0 / (np.float64(base) ** (np.arange(0, r, 2, dtype=np.float64) / r))  # [r/2]
    freq, perm, sign = [], [], []
    for b, turns in enumerate(blocks):
        for head in range(h):
            at = (b * h + head) * dh
            for j in range(dh):
                if turns and j < r:
                    half = r // 2
                    freq.append(inv[j % half])
                    perm.append(at + (j + half if j < half else j - half))
                    sign.append(-1.0 if j < half else 1.0)
                else:
                    freq.append(0.0)
                    perm.append(at + j)
                    sign.append(0.0)
    pos = c.emit(R.reshape(R.arange(0, t_len, 1, dtype=adt), [t_len, tirx.IntImm("int64", 1)]))
    angles = c.emit(R.multiply(pos, relax.const(np.array(freq).astype(adt), adt)))  # [T, w]
    cos = _cast(c, c.emit(R.cos(angles)), c.dtype)
    sin = _cast(c, c.emit(R.multiply(c.emit(R.sin(angles)), relax.const(np.array(sign).astype(adt), adt))), c.dtype)
    rot = c.emit(R.take(x, relax.const(np.array(perm, dtype="int64"), "int64"), axis=-1, mode="clip"))
    return c.emit(R.add(c.emit(R.multiply(x, cos)), c.emit(R.multiply(rot, sin))))


def _attention(c: Ctx, xs: list) -> relax.Expr:
    """Multi-head softmax attention written out, as backends/pytorch's MultiHeadAttention (math path).

    attrs: heads, causal, kv? (keys/values from a second input, whose batch dimensions broadcast to
    x's), mask?, prefix?, bias, dropout (inference: none), qkv (one fused [3d, d] projection for q, k
    and v), impl ('math' or 'sdpa': the same function), head_dim (q, k and v of width heads * head_dim,
    default d), rope / rope_dim (rotary embeddings of q and k: `_rope`; prefix rows unrotated), kv_heads
    (grouped-query attention: k, v and the prefix rows of kv_heads * head_dim columns, each key/value head
    repeated for its heads / kv_heads query heads by one `take` of columns, `_repeat_kv`, before the
    attention core: the written-out one or the fused CPU kernel). Inputs: x, kv?, mask?, prefix?.
    """
    x = xs[0]
    has_kv, has_mask = bool(c.a("kv?")), bool(c.a("mask?"))
    kv = xs[1] if has_kv else x
    mask = xs[1 + has_kv] if has_mask else None
    prefix = xs[1 + has_kv + has_mask] if c.a("prefix?") else None
    xt = c.in_type(0)
    kvt = c.in_type(1) if has_kv else xt
    head_dim = c.a("head_dim")
    d = xt.shape[-1] if head_dim is None else int(c.a("heads")) * int(head_dim)  # the width of q, k and v
    bias = bool(c.a("bias"))

    def proj(name: str, inp: relax.Expr) -> relax.Expr:
        return _linear(c, inp, c.weight(f"{name}.weight"), c.weight(f"{name}.bias") if bias else None, name)

    h = int(c.a("heads"))
    kvh = h if c.node.attr("kv_heads") is None else int(c.node.attr("kv_heads"))
    rope = c.node.attr("rope")
    if rope is not None:
        if has_kv:
            raise LoweringError("attention: rope needs self-attention (no kv)")
        dh, rope_dim = int(d) // h, c.node.attr("rope_dim")
        r = dh if rope_dim is None else int(rope_dim)

        def turn(t: relax.Expr, blocks: tuple[bool, ...], heads: int = h) -> relax.Expr:
            return _rope(c, t, c.dim(xt.shape[-2]), heads, dh, r, float(rope), blocks)
    if kvh != h:  # grouped-query attention: k and v of kv_heads heads, repeated to h before the core
        if c.a("qkv"):
            if has_kv:
                raise LoweringError("attention: a fused qkv projection needs self-attention (no kv)")
            dk = int(d) // h * kvh
            parts = c.emit(R.split(proj("qkv", x), [tirx.IntImm("int64", int(d)), tirx.IntImm("int64", int(d) + dk)],
                                   axis=-1))
            q, k, v = (c.emit(relax.TupleGetItem(parts, i)) for i in range(3))
        else:
            q, k, v = proj("q", x), proj("k", kv), proj("v", kv)
        if rope is not None:
            q, k = turn(q, blocks=(True,)), turn(k, blocks=(True,), heads=kvh)
        k, v = _repeat_kv(c, k, h, kvh, int(d) // h), _repeat_kv(c, v, h, kvh, int(d) // h)
        if prefix is not None:
            prefix = _repeat_kv(c, prefix, h, kvh, int(d) // h)
    elif c.a("qkv"):
        if has_kv:
            raise LoweringError("attention: a fused qkv projection needs self-attention (no kv)")
        qkv = proj("qkv", x)
        if rope is not None:  # q and k turned in place, v as it is: the kernel still reads column blocks
            qkv = turn(qkv, blocks=(True, True, False))
        if _fused_attention_applies(c, xt, mask, prefix):  # the kernel reads q, k, v as column blocks
            dims = int(d)
            y = fused_attention(c.bb, c.kernels, qkv, qkv, qkv, c.shape(xt.shape[:-2]), c.dim(xt.shape[-2]),
                                c.dim(xt.shape[-2]), dims, int(c.a("heads")), bool(c.a("causal")), c.dtype,
                                c.lanes, ((3 * dims, 0), (3 * dims, dims), (3 * dims, 2 * dims)))
            return _linear(c, c.emit(y), c.weight("o.weight"), c.weight("o.bias") if bias else None, "o")
        parts = c.emit(R.split(qkv, [tirx.IntImm("int64", d), tirx.IntImm("int64", 2 * d)], axis=-1))
        q, k, v = (c.emit(relax.TupleGetItem(parts, i)) for i in range(3))
    else:
        q, k, v = proj("q", x), proj("k", kv), proj("v", kv)
        if rope is not None:
            q, k = turn(q, blocks=(True,)), turn(k, blocks=(True,))
    kt = TensorType(xt.dtype, kvt.shape[:-1] + (d,))
    qt = TensorType(xt.dtype, xt.shape[:-1] + (d,))
    y = _attend_core(c, q, k, v, qt, kt, int(c.a("heads")), bool(c.a("causal")), mask,
                     c.in_type(1 + has_kv) if has_mask else None, prefix,
                     c.in_type(1 + has_kv + has_mask) if prefix is not None else None)
    return _linear(c, y, c.weight("o.weight"), c.weight("o.bias") if bias else None, "o")


def _repeat_kv(c: Ctx, x: relax.Expr, h: int, kvh: int, dh: int) -> relax.Expr:
    """[..., kvh * dh] -> [..., h * dh]: key/value head j repeated for query heads j * g .. j * g + g - 1
    (g = h / kvh; torch's repeat_interleave of the heads), one take of columns."""
    g = h // kvh
    cols = np.array([(i // g) * dh + j for i in range(h) for j in range(dh)], dtype="int64")
    return c.emit(R.take(x, relax.const(cols, "int64"), axis=-1, mode="clip"))


def _attend(c: Ctx, xs: list) -> relax.Expr:
    """attend(q, k, v, heads, causal, mask?, prefix?, kv_heads): the attention core over the spec's own
    projections. kv_heads (grouped-query attention): k, v and the prefix rows have kv_heads * head_dim
    columns, each key/value head repeated for its heads / kv_heads query heads by one take of columns
    (`_repeat_kv`, as the attention layer's) before the core."""
    has_mask = bool(c.a("mask?"))
    mask = xs[3] if has_mask else None
    prefix = xs[3 + has_mask] if c.a("prefix?") else None
    q, k, v = xs[0], xs[1], xs[2]
    qt, kt = c.in_type(0), c.in_type(1)
    h = int(c.a("heads"))
    kvh = h if c.node.attr("kv_heads") is None else int(c.node.attr("kv_heads"))
    if kvh != h:
        dh = int(qt.shape[-1]) // h
        k, v = _repeat_kv(c, k, h, kvh, dh), _repeat_kv(c, v, h, kvh, dh)
        if prefix is not None:
            prefix = _repeat_kv(c, prefix, h, kvh, dh)
        kt = TensorType(kt.dtype, kt.shape[:-1] + (qt.shape[-1],))
    return _attend_core(c, q, k, v, qt, kt, h, bool(c.a("causal")), mask, c.in_type(3) if has_mask else None, prefix,
                        c.in_type(3 + has_mask) if prefix is not None else None)


def _mlp(c: Ctx, xs: list) -> relax.Expr:
    bias = bool(c.a("bias"))
    y = _linear(c, xs[0], c.weight("fc1.weight"), c.weight("fc1.bias") if bias else None, "fc1")
    y = _act(c, c.a("act"), y)
    return _linear(c, y, c.weight("fc2.weight"), c.weight("fc2.bias") if bias else None, "fc2")


# -- LSTM, GRU -----------------------------------------------------------------------------------

#: The recurrent cells with a scan kernel: gates per state entry, in torch.nn.LSTM's and torch.nn.GRU's
#: layouts (LSTM: i, f, g, o; GRU: r, z, n).
RECURRENT_GATES = {"lstm": 4, "gru": 3}


def recurrent_kernel(cell: str, hidden: int, reverse: bool, dtype: str) -> tirx.PrimFunc:
    """One direction of one LSTM or GRU layer (`cell`) as a CPU TIR kernel over a symbolic batch B and length L.

    In: xp [B, L, G] (G = gates * H: the input projection for every step; for the LSTM plus both
    biases, for the GRU plus b_ih), w: the LSTM's w_hh^T [H, 4H], the GRU's [w_hh^T; b_hh] [H + 1, 3H]
    (b_hh as a last row: the n gate needs W_hn h + b_hn apart from the input's share), transposed,
    contiguous along the gates (with lifting, once at bind time).
    Out: h [B, L, H] (the hidden state at each step, aligned with the input steps), and scratch
    buffers c [B, H] (the LSTM's cell state; the GRU's h) and g [B, G] (the current step's gates: the
    LSTM's pre-activations, the GRU's hidden projection W_hh h + b_hh, then z and n over its z and n
    entries). h0 = c0 = 0.
    LSTM: c = sig(f) c + sig(i) tanh(g), h = sig(o) tanh(c). GRU: r = sig(xp_r + g_r), z = sig(xp_z + g_z),
    n = tanh(xp_n + r g_n), h = n + z (h - n) (torch's (1 - z) n + z h, as torch computes it).
    The batch rows are independent recurrences: they run in parallel, each its serial loop over the
    steps. A step's gates are accumulated JC at a time in a local (register) tile over h's H entries,
    vectorised along the gates; the state update is vectorised too, with polynomial sigmoid/tanh in
    float32.
    """
    from tvm.script import tirx as T

    gru = cell == "gru"
    H, G = hidden, RECURRENT_GATES[cell] * hidden
    WR = 1 if gru else 0  # w's rows after w_hh^T's H: the GRU's b_hh
    # gates per register tile (G = 4H: a multiple of 4; G = 3H: of 3)
    JC = next(n for n in ((64, 48, 32, 24, 16, 12, 8, 6, 4, 3) if gru else (64, 32, 16, 8, 4)) if G % n == 0)
    HC = next(n for n in (16, 8, 4, 2, 1) if H % n == 0)  # state entries per vector
    rev = 1 if reverse else 0
    sig, tanh = gate_fns(dtype)

    @T.prim_func(private=True)
    def recurrent_scan(var_xp: T.handle, var_w: T.handle, var_out: T.handle, var_c: T.handle, var_g: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        L = T.int64()
        xp = T.match_buffer(var_xp, (B, L, G), dtype)
        w = T.match_buffer(var_w, (H + WR, G), dtype)
        out = T.match_buffer(var_out, (B, L, H), dtype)
        c = T.match_buffer(var_c, (B, H), dtype)
        g = T.match_buffer(var_g, (B, G), dtype)
        for b in T.parallel(B):
            acc = T.decl_buffer((JC,), dtype, scope="local")
            for j in range(H):
                c[b, j] = T.Cast(dtype, 0)
            for s in range(L):
                t = rev * (L - 1) + (1 - 2 * rev) * s  # the step this iteration computes
                tp = t - (1 - 2 * rev)  # the step before it, in the direction of the scan
                for jo in range(G // JC):
                    if gru:  # W_hh h + b_hh: from the bias row
                        for ji in T.vectorized(JC):
                            acc[ji] = w[H, jo * JC + ji]
                    else:
                        for ji in T.vectorized(JC):
                            acc[ji] = xp[b, t, jo * JC + ji]
                    if s > 0:
                        for k in range(H):
                            for ji in T.vectorized(JC):
                                acc[ji] = acc[ji] + out[b, tp, k] * w[k, jo * JC + ji]
                    for ji in T.vectorized(JC):
                        g[b, jo * JC + ji] = acc[ji]
                for jo in range(H // HC):
                    for ji in T.vectorized(HC):
                        if gru:  # z, n over g's entries: a let in a vectorised loop miscompiles (TVM 0.27)
                            g[b, H + jo * HC + ji] = sig(xp[b, t, H + jo * HC + ji] + g[b, H + jo * HC + ji])
                            g[b, 2 * H + jo * HC + ji] = tanh(xp[b, t, 2 * H + jo * HC + ji] + sig(
                                xp[b, t, jo * HC + ji] + g[b, jo * HC + ji]) * g[b, 2 * H + jo * HC + ji])
                            c[b, jo * HC + ji] = g[b, 2 * H + jo * HC + ji] + g[b, H + jo * HC + ji] * (
                                c[b, jo * HC + ji] - g[b, 2 * H + jo * HC + ji])
                            out[b, t, jo * HC + ji] = c[b, jo * HC + ji]
                        else:
                            c[b, jo * HC + ji] = (sig(g[b, H + jo * HC + ji]) * c[b, jo * HC + ji]
                                                  + sig(g[b, jo * HC + ji]) * tanh(g[b, 2 * H + jo * HC + ji]))
                            out[b, t, jo * HC + ji] = sig(g[b, 3 * H + jo * HC + ji]) * tanh(c[b, jo * HC + ji])

    return recurrent_scan


def recurrent_kernel_gpu(cell: str, hidden: int, reverse: bool, dtype: str, max_threads: int = 1024) -> tirx.PrimFunc:
    """The kernel of `recurrent_kernel` for CUDA: one thread block per batch row, a thread per gate.

    Same buffers and call signature, w not transposed: the LSTM's w_hh [4H, H], the GRU's
    [w_hh, b_hh] [3H, H + 1] (b_hh as a last column). The c/g scratch outputs are unused: the state
    lives in registers, h and the gates in shared memory. Each step: every thread computes its gates
    from h in shared memory, a barrier, the first H threads update the state and h, a barrier.
    Compiled and checked by reading the generated CUDA; not yet run on a GPU.
    """
    from tvm.script import tirx as T

    gru = cell == "gru"
    H, G = hidden, RECURRENT_GATES[cell] * hidden
    WC = 1 if gru else 0  # w's columns after w_hh's H: the GRU's b_hh
    NT = min(max_threads, (G + 31) // 32 * 32)
    RG = (G + NT - 1) // NT  # gates per thread
    RH = (H + NT - 1) // NT  # state elements per thread
    rev = 1 if reverse else 0

    @T.prim_func(private=True)
    def recurrent_scan(var_xp: T.handle, var_w: T.handle, var_out: T.handle, var_c: T.handle, var_g: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        L = T.int64()
        xp = T.match_buffer(var_xp, (B, L, G), dtype)
        w = T.match_buffer(var_w, (G, H + WC), dtype)
        out = T.match_buffer(var_out, (B, L, H), dtype)
        T.match_buffer(var_c, (B, H), dtype)
        T.match_buffer(var_g, (B, G), dtype)
        for b in T.thread_binding(B, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                hs = T.decl_buffer((H,), dtype, scope="shared")
                gs = T.decl_buffer((G,), dtype, scope="shared")
                cl = T.decl_buffer((RH,), dtype, scope="local")
                acc = T.decl_buffer((1,), dtype, scope="local")
                for r in range(RH):
                    if r * NT + tx < H:
                        hs[r * NT + tx] = T.Cast(dtype, 0)
                    cl[r] = T.Cast(dtype, 0)
                T.tvm_storage_sync("shared")
                for s in range(L):
                    t = rev * (L - 1) + (1 - 2 * rev) * s
                    for r in range(RG):
                        if r * NT + tx < G:
                            if gru:  # W_hh h + b_hh: from the bias column
                                acc[0] = w[r * NT + tx, H]
                            else:
                                acc[0] = xp[b, t, r * NT + tx]
                            for k in range(H):
                                acc[0] = acc[0] + hs[k] * w[r * NT + tx, k]
                            gs[r * NT + tx] = acc[0]
                    T.tvm_storage_sync("shared")
                    for r in range(RH):
                        if r * NT + tx < H:
                            j = r * NT + tx
                            if gru:  # cl holds h
                                z = T.sigmoid(xp[b, t, H + j] + gs[H + j])
                                n = T.tanh(xp[b, t, 2 * H + j] + T.sigmoid(xp[b, t, j] + gs[j]) * gs[2 * H + j])
                                cl[r] = n + z * (cl[r] - n)
                                hs[j] = cl[r]
                                out[b, t, j] = cl[r]
                            else:
                                cl[r] = T.sigmoid(gs[H + j]) * cl[r] + T.sigmoid(gs[j]) * T.tanh(gs[2 * H + j])
                                hs[j] = T.sigmoid(gs[3 * H + j]) * T.tanh(cl[r])
                                out[b, t, j] = T.sigmoid(gs[3 * H + j]) * T.tanh(cl[r])
                    T.tvm_storage_sync("shared")

    return recurrent_scan


def lstm_kernel(hidden: int, reverse: bool, dtype: str) -> tirx.PrimFunc:
    """`recurrent_kernel` of the LSTM."""
    return recurrent_kernel("lstm", hidden, reverse, dtype)


def lstm_kernel_gpu(hidden: int, reverse: bool, dtype: str, max_threads: int = 1024) -> tirx.PrimFunc:
    """`recurrent_kernel_gpu` of the LSTM."""
    return recurrent_kernel_gpu("lstm", hidden, reverse, dtype, max_threads)


def gru_kernel(hidden: int, reverse: bool, dtype: str) -> tirx.PrimFunc:
    """`recurrent_kernel` of the GRU."""
    return recurrent_kernel("gru", hidden, reverse, dtype)


def gru_kernel_gpu(hidden: int, reverse: bool, dtype: str, max_threads: int = 1024) -> tirx.PrimFunc:
    """`recurrent_kernel_gpu` of the GRU."""
    return recurrent_kernel_gpu("gru", hidden, reverse, dtype, max_threads)


def _recurrent(cell: str) -> Lowering:
    """lstm / gru: per layer and direction, the input projection of every step (one Relax matmul), then
    the scan kernel (call_tir); the directions' outputs concatenated, forward first."""
    gates = RECURRENT_GATES[cell]

    def lower(c: Ctx, xs: list) -> relax.Expr:
        if c.target_kind == "llvm":
            make_kernel = recurrent_kernel
        elif c.target_kind == "cuda":
            make_kernel = recurrent_kernel_gpu
        else:
            raise LoweringError(f"{cell}: no recurrence kernel for target {c.target_kind} (llvm and cuda only)")
        xt = c.in_type(0)
        hidden, layers = int(c.a("hidden")), int(c.a("layers"))
        dirs = ("", "_reverse") if c.a("bidirectional") else ("",)
        bsz, length = c.dim(xt.shape[0]), c.dim(xt.shape[1])
        H = tirx.IntImm("int64", hidden)
        dtype = DTYPES[xt.dtype]
        y = xs[0]
        for layer in range(layers):
            outs = []
            for suffix in dirs:
                key = (cell, hidden, bool(suffix), dtype)
                if key not in c.kernels:
                    c.kernels[key] = c.bb.add_func(make_kernel(cell, hidden, bool(suffix), dtype),
                                                   f"{cell}_scan_h{hidden}{'_rev' if suffix else ''}")
                w_ih, w_hh = c.weight(f"weight_ih_l{layer}{suffix}"), c.weight(f"weight_hh_l{layer}{suffix}")
                b_ih, b_hh = c.weight(f"bias_ih_l{layer}{suffix}"), c.weight(f"bias_hh_l{layer}{suffix}")
                if cell == "lstm":
                    xp = _linear(c, y, w_ih, c.emit(R.add(b_ih, b_hh)), f"lstm_xp_l{layer}{suffix}")
                    if c.target_kind == "llvm":  # the CPU kernel reads w_hh^T [H, 4H]: vectors along the gates
                        w_hh = c.emit(R.permute_dims(w_hh, [1, 0]))
                else:  # b_hh stays apart (r * (W_hn h + b_hn)): a last row of w_hh^T, or column of w_hh
                    xp = _linear(c, y, w_ih, b_ih, f"gru_xp_l{layer}{suffix}")
                    if c.target_kind == "llvm":
                        w_hh = c.emit(R.concat([R.permute_dims(w_hh, [1, 0]),
                                                R.reshape(b_hh, [1, gates * hidden])], axis=0))
                    else:
                        w_hh = c.emit(R.concat([w_hh, R.reshape(b_hh, [gates * hidden, 1])], axis=1))
                res = c.emit(relax.call_tir(c.kernels[key], [xp, w_hh], out_ty=[
                    relax.TensorType([bsz, length, H], dtype),
                    relax.TensorType([bsz, H], dtype),
                    relax.TensorType([bsz, tirx.IntImm("int64", gates * hidden)], dtype),
                ]))
                outs.append(c.emit(relax.TupleGetItem(res, 0), f"{cell}_h_l{layer}{suffix}"))
            y = outs[0] if len(outs) == 1 else c.emit(R.concat(outs, axis=-1))
        return y
    return lower


# -- reductions, shapes ------------------------------------------------------------------------

def _softmax(c: Ctx, xs: list) -> relax.Expr:
    if c.out.rank == 0:  # of a scalar: the softmax of one entry (1, or nan for a nan or an infinity)
        return R.reshape(c.emit(R.nn.softmax(c.emit(R.reshape(xs[0], [1])), axis=0)), [])
    return R.nn.softmax(xs[0], axis=int(c.a("dim")))


def _reduce(fn: Callable) -> Lowering:
    def lower(c: Ctx, xs: list) -> relax.Expr:
        x = _cast(c, xs[0], c.dtype)  # sum of bool counts in i64
        dims = c.a("dim")
        rank = c.in_type(0).rank
        if dims is None:
            axes = list(range(rank))
        else:
            axes = sorted(_axis(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims]))
        if rank == 0:  # sum(s, dim=0) of a scalar: the scalar
            return x
        if c.dtype in _HALF:
            y = c.emit(fn(c.emit(R.astype(x, "float32")), axis=axes, keepdims=bool(c.a("keepdim"))))
            return R.astype(y, c.dtype)
        return fn(x, axis=axes, keepdims=bool(c.a("keepdim")))

    return lower


def _transpose(c: Ctx, xs: list) -> relax.Expr:
    rank = c.in_type(0).rank
    axes = list(range(rank))
    a, b = _axis(c.a("dim0"), rank), _axis(c.a("dim1"), rank)
    axes[a], axes[b] = axes[b], axes[a]
    return R.permute_dims(xs[0], axes)


def _permute(c: Ctx, xs: list) -> relax.Expr:
    rank = c.in_type(0).rank
    return R.permute_dims(xs[0], [_axis(d, rank) for d in c.a("dims")])


def _reshape(c: Ctx, xs: list) -> relax.Expr:
    return R.reshape(xs[0], c.shape(c.out.shape))  # the output type has the -1 resolved


def _concat(c: Ctx, xs: list) -> relax.Expr:
    return R.concat(list(xs), axis=_axis(c.a("dim"), c.out.rank))


def _stack(c: Ctx, xs: list) -> relax.Expr:
    return R.stack(list(xs), axis=_axis(c.a("dim"), c.out.rank))


def _flip(c: Ctx, xs: list) -> relax.Expr:
    dims = c.a("dims")
    y = xs[0]
    if c.out.rank == 0:  # one entry: nothing to reverse
        return y
    for d in dims if isinstance(dims, (list, tuple)) else [dims]:
        y = c.emit(R.flip(y, _axis(d, c.out.rank)))
    return y


def _split(c: Ctx, xs: list) -> tuple:
    axis = _axis(c.a("dim"), c.in_type(0).rank)
    cuts, at = [], 0
    for t in c.node.outputs[:-1]:
        at = at + t.shape[axis]
        cuts.append(c.dim(at))
    parts = c.emit(R.split(xs[0], cuts, axis=axis))
    return tuple(relax.TupleGetItem(parts, i) for i in range(len(c.node.outputs)))


def _getitem(c: Ctx, xs: list) -> relax.Expr:
    xt = c.in_type(0)
    axes, begin, end, strides, drop = [], [], [], [], []
    for axis, item in enumerate(c.a("index")):
        n = xt.shape[axis]
        step = 1
        if item[0] == "int":
            i = item[1] + n if item[1] < 0 else item[1]
            lo, hi = i, i + 1
            drop.append(axis)
        else:
            _, lo, hi = item[:3]
            step = slice_step(item)
            lo = 0 if lo is None else lo
            hi = n if hi is None else hi
            lo = lo + n if isinstance(lo, int) and lo < 0 else lo
            hi = hi + n if isinstance(hi, int) and hi < 0 else hi
        axes.append(axis)
        begin.append(c.dim(lo))
        end.append(c.dim(hi))
        strides.append(step)
    # strides only when one is not 1, so that step-1 slices lower as they did before strides
    y = c.emit(R.strided_slice(xs[0], axes, begin, end, strides if any(s != 1 for s in strides) else None,
                               assume_inbound=True)) if axes else xs[0]
    return R.squeeze(y, drop) if drop else y


# -- one-hot, convolutional models --------------------------------------------------------------

def _one_hot(c: Ctx, xs: list) -> relax.Expr:
    """ids [...] -> [..., num]: ids == arange(num), as the node's float dtype (an id outside range(num): zeros)."""
    ids = xs[0]
    num = int(c.a("num"))
    hot = c.emit(R.equal(c.emit(R.expand_dims(ids, [-1])), R.arange(0, num, 1, dtype=ids.ty.dtype)))
    return R.astype(hot, c.dtype)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * n


#: How conv1d/conv2d are written: "implicit" is one kernel, a matmul over the window taps whose gather the
#: CPU Matmul schedule computes inside its packing of B (implicit GEMM; grouped convs are "im2col");
#: "im2col" gathers the input windows into columns by a kernel of its own and multiplies them with the
#: weights as one (grouped) matmul; "relax" is R.nn.conv1d/conv2d (legalised to direct loops).
#: "auto": implicit for CPU targets, relax for GPUs.
CONV_IMPL = "auto"


def _te_im2col(x: te.Tensor, kernel: tuple, stride: tuple, dilation: tuple, out_sp: list, groups: int,
               attrs: dict | None = None) -> te.Tensor:
    """cols[b, g, c, *k, *p] = x[b, g * C/G + c, p * stride + k * dilation]: the window taps of every output
    position of an input already padded (_pad_input), one gather."""
    n = len(kernel)
    cg = x.shape[1] // groups

    def at(b, g, c, *rest):
        ks, ps = rest[:n], rest[n:]
        return x[(b, g * cg + c) + tuple(p * s + k * d for p, k, s, d in zip(ps, ks, stride, dilation))]

    i64 = lambda v: tirx.IntImm("int64", v) if isinstance(v, int) else v  # noqa: E731
    shape = tuple(i64(v) for v in (x.shape[0], groups, cg) + tuple(kernel) + tuple(out_sp))  # int64, as Relax's
    return te.compute(shape, lambda *i: at(*i), name="im2col", attrs=attrs)


def _dims_key(shape: Sequence[Any]) -> str:
    """Static sizes as they are, symbolic ones by which are equal: (2, s0, 8, s0)."""
    seen: dict[str, int] = {}
    return str(tuple(d if isinstance(d, int) else f"s{seen.setdefault(str(d), len(seen))}" for d in shape))


def _window_out(n: Any, k: int, stride: int, dilation: int) -> Any:
    """floor((n - dilation (k - 1) - 1) / stride) + 1 (n padded already), on a TIR size."""
    if isinstance(n, tirx.IntImm):
        return tirx.IntImm("int64", int(n.value - dilation * (k - 1) - 1) // stride + 1)
    span = n + tirx.IntImm("int64", -dilation * (k - 1) - 1)
    return (span if stride == 1 else tirx.floordiv(span, tirx.IntImm("int64", stride))) + tirx.IntImm("int64", 1)


def _pad_input(c: Ctx, x: relax.Expr, before: list, after: list) -> tuple[relax.Expr, list[Any]]:
    """x [B, C, *spatial] with zeros around its spatial axes (one small injective kernel), and its sizes:
    static ints, or a name per symbolic size (`T`, `T+2`). The gathers then read every tap inside the
    tensor, with no bounds test (a test TVM's simplifier drops from the loads of a Select, which would
    then read before or after the tensor)."""
    dims = _size_keys(c.in_type(0).shape)
    if not (any(before) or any(after)):
        return x, dims
    x = c.emit(R.nn.pad(x, [0, 0, 0, 0] + [v for ba in zip(before, after) for v in ba]))
    return x, dims[:2] + [d + b0 + a0 if isinstance(d, int) else f"{d}+{b0 + a0}" if b0 + a0 else d
                          for d, b0, a0 in zip(dims[2:], before, after)]


def _size_keys(dims: Sequence[Any]) -> list[Any]:
    """Sizes as _te_sizes takes them: static ones as ints, symbolic ones by name."""
    return [d if isinstance(d, int) else str(d) for d in dims]


def _te_sizes(*key_dims: list[Any]) -> list[list[Any]]:
    """TIR sizes for shapes given as _pad_input gives them: int64 constants, and one variable per
    distinct symbolic size, shared by the shapes (a TIR function reads a variable, not an expression
    such as L + 2 or 4 * B, from its argument's shape; and FuseTIR binds a variable to whatever
    expression the caller's shape has, where it would match an expression term by term)."""
    fresh: dict[str, tirx.Var] = {}
    return [[tirx.IntImm("int64", d) if isinstance(d, int) else fresh.setdefault(d, tirx.Var(
        f"n{len(fresh)}", "int64")) for d in dims] for dims in key_dims]


def _im2col_conv(c: Ctx, x: relax.Expr, n: int, kernel: tuple, stride: tuple, dilation: tuple, before: list,
                 after: list, groups: int) -> relax.Expr:
    """x [B, C, *spatial] -> [B, out, *spatial']: the k window taps of every output position gathered as
    columns [B, G, C/G * k, P] (P output positions), then W [G, out/G, C/G * k] @ columns."""
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    xt = c.in_type(0)
    bsz, cin = c.dim(xt.shape[0]), int(xt.shape[1])
    out_sp = c.shape(c.out.shape[2:])
    cout = int(c.out.shape[1])
    k = math.prod(kernel)
    x, in_dims = _pad_input(c, x, before, after)
    if k == 1 and all(s == 1 for s in stride):
        cols = x  # [B, C, *spatial]: a 1x1 convolution reads the input as it is
    else:
        # A kernel of its own, marked opaque to fusion: FuseTIR cannot merge a TE function written over the
        # symbolic sizes into the static-shape copies of `main` that tuning adds (specialise).
        key = ("im2col", DTYPES[xt.dtype], _dims_key(in_dims), kernel, stride, dilation, groups)
        if key not in c.kernels:
            (dims,) = _te_sizes(in_dims)
            xp = te.placeholder(dims, DTYPES[xt.dtype], name="x")
            sp = [_window_out(d, kk, st, dl) for d, kk, st, dl in zip(dims[2:], kernel, stride, dilation)]
            out = _te_im2col(xp, kernel, stride, dilation, sp, groups)
            func = te.create_prim_func([xp, out]).with_attr("op_pattern", 8).with_attr("tirx.noalias", True)
            c.kernels[key] = c.bb.add_func(func.without_attr("global_symbol"), "im2col")
        shape = [bsz, i64(groups), i64(cin // groups)] + [i64(v) for v in kernel] + out_sp
        cols = c.emit(relax.call_tir(c.kernels[key], [x], out_ty=relax.TensorType(shape, DTYPES[xt.dtype])))
    positions = out_sp[0] if n == 1 else out_sp[0] * out_sp[1]
    cols = c.emit(R.reshape(cols, [bsz, i64(groups), i64(cin // groups * k), positions]))
    w = c.emit(R.reshape(c.weight("weight"), [i64(groups), i64(cout // groups), i64(cin // groups * k)]))
    y = c.emit(R.matmul(w, cols))  # [B, G, out/G, P]
    return c.emit(R.reshape(y, [bsz, i64(cout)] + out_sp))


def _conv_gemm(c: Ctx, x: relax.Expr, kernel: tuple, stride: tuple, dilation: tuple, before: list,
               after: list) -> relax.Expr:
    """An ungrouped conv1d/conv2d as one TIR kernel, implicit GEMM: y[b, o, *p] = sum over (c, *k) of
    W[o, c, *k] * x[b, c, p * stride + k * dilation] (x padded first). The window gather is a block of its
    own (GATHER_MARK) that the CPU Matmul schedule computes inside B's panel packing, so the
    [C * k, B * P] column matrix is never written whole (im2col wrote 9x the input for a 3x3 conv, and
    the matmul read it back). The output is in its final layout [B, O, *spatial'], so bias, activation
    and residual fuse onto it (repvgg at batch 8, 2 threads: 0.93x -> 0.65x of torch eager)."""
    xt = c.in_type(0)
    cout = int(c.out.shape[1])
    dt = DTYPES[xt.dtype]
    spatial_symbolic = any(not isinstance(d, int) for d in c.out.shape[2:])
    if spatial_symbolic and len(kernel) == 2 and stride == (1, 1):
        return _conv_gemm_wide(c, x, kernel, dilation, before, after)
    x, in_dims = _pad_input(c, x, before, after)
    gather = math.prod(kernel) > 1 or any(s != 1 for s in stride)
    # Every symbolic size of the input and the output is a variable of its own (the output's not
    # computed from the input's), which the call binds to the caller's size. FuseTIR merges the kernel
    # with the bias and activation after it when each output size is a symbol of the graph (B, L):
    # it matches the output buffer with the next kernel's input variable by variable, so an output
    # size such as L - 2 or 4 * B leaves the kernel opaque (unfused).
    out_dims = _size_keys((xt.shape[0], cout, *c.out.shape[2:]))
    fusable = all(isinstance(d, int) or isinstance(c.dim(d), tirx.Var) for d in (xt.shape[0], *c.out.shape[2:]))
    key = ("conv_gemm", dt, _dims_key(in_dims + out_dims), kernel, stride, dilation, fusable)
    if key not in c.kernels:
        dims, sp = _te_sizes(in_dims, out_dims)
        xp = te.placeholder(dims, dt, name="x")
        wp = te.placeholder([tirx.IntImm("int64", v) for v in (cout, int(xt.shape[1])) + tuple(kernel)], dt,
                            name="w")
        if gather:
            cols = _te_im2col(xp, kernel, stride, dilation, sp[2:], 1, attrs={GATHER_MARK: 1})  # [B, 1, C, *k, *p]
            read = lambda b, ch, ks, ps: cols[(b, 0, ch) + tuple(ks) + tuple(ps)]  # noqa: E731
        else:
            read = lambda b, ch, ks, ps: xp[(b, ch) + tuple(ps)]  # noqa: E731
        rc = te.reduce_axis((0, dims[1]), name="rc")
        rk = [te.reduce_axis((0, tirx.IntImm("int64", kk)), name=f"rk{i}") for i, kk in enumerate(kernel)]

        def conv(b, o, *ps):
            return te.sum(wp[(o, rc) + tuple(rk)] * read(b, rc, rk, ps), axis=[rc] + rk)

        # symbolic output sizes: the batch is the matmul's batch axis (BATCH_MARK), not part of the
        # output positions, which would be recovered by a division by the runtime length at every index
        out = te.compute(sp, conv, name="conv", attrs={BATCH_MARK: 1} if spatial_symbolic else None)
        # op_pattern 4 (out-elementwise fusable, as a matmul): FuseOps puts the bias, activation and
        # residual after it into the same kernel; 8: opaque
        func = te.create_prim_func([xp, wp, out]).with_attr("op_pattern", 4 if fusable else 8) \
            .with_attr("tirx.noalias", True)
        c.kernels[key] = c.bb.add_func(func.without_attr("global_symbol"), "conv")
    out_ty = relax.TensorType([c.dim(xt.shape[0]), tirx.IntImm("int64", cout)] + c.shape(c.out.shape[2:]), dt)
    return c.emit(relax.call_tir(c.kernels[key], [x, c.weight("weight")], out_ty=out_ty))


def _conv_gemm_wide(c: Ctx, x: relax.Expr, kernel: tuple, dilation: tuple, before: list,
                    after: list) -> relax.Expr:
    """A stride-1 conv2d over symbolic image sizes as one implicit-GEMM kernel without index divisions.

    The output is computed on the padded width Wp (Wp - W' columns more per row, dropped after), so
    that output position p = h * Wp + w reads tap (kh, kw) at p + kh * dh * Wp + kw * dw of the padded
    input flattened per channel: a fixed offset. Computed on the output's own width, every gathered
    index and every written one would be recovered from p by a division by the runtime width (the
    conv of a 12x16 image ran 7x slower than at static sizes). One more zero row under the input keeps
    the extra columns' taps of the last row inside it. The batch is the matmul's batch axis
    (BATCH_MARK), so positions do not run across images either."""
    xt = c.in_type(0)
    cin, cout = int(xt.shape[1]), int(c.out.shape[1])
    dt = DTYPES[xt.dtype]
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    bsz, w = c.dim(xt.shape[0]), c.dim(xt.shape[3])
    wp = w + i64(before[1] + after[1])
    extra = 1 if kernel[1] > 1 else 0  # no tap right of a 1-wide kernel's column: no row needed under it
    if any(before) or any(after) or extra:
        x = c.emit(R.nn.pad(x, [0, 0, 0, 0, before[0], after[0] + extra, before[1], after[1]]))
    key = ("conv_wide", dt, cin, cout, kernel, dilation)
    if key not in c.kernels:
        b_, n_, h_, w_ = (tirx.Var(v, "int64") for v in ("n0", "n1", "n2", "n3"))
        # the padded input [B, C, rows, Wp], read through its row 0 at the flat offset of the tap (a
        # reshape to [B, C, rows * Wp] would be a copy: TVM does not see it as a view at symbolic sizes)
        xp = te.placeholder([b_, i64(cin), n_, w_], dt, name="x")
        wt = te.placeholder([i64(v) for v in (cout, cin) + tuple(kernel)], dt, name="w")
        cols = te.compute((b_, i64(cin), i64(kernel[0]), i64(kernel[1]), h_, w_),
                          lambda b, ch, kh, kw, y, z: xp[b, ch, i64(0), (y + kh * dilation[0]) * w_ + z
                                                         + kw * dilation[1]],
                          name="cols", attrs={GATHER_MARK: 1})
        rc = te.reduce_axis((0, i64(cin)), name="rc")
        rk = [te.reduce_axis((0, i64(kk)), name=f"rk{i}") for i, kk in enumerate(kernel)]
        out = te.compute((b_, i64(cout), h_, w_),
                         lambda b, o, y, z: te.sum(wt[o, rc, rk[0], rk[1]] * cols[b, rc, rk[0], rk[1], y, z],
                                                   axis=[rc] + rk),
                         name="conv", attrs={BATCH_MARK: 1})
        func = te.create_prim_func([xp, wt, out]).with_attr("op_pattern", 8).with_attr("tirx.noalias", True)
        c.kernels[key] = c.bb.add_func(func.without_attr("global_symbol"), "conv")
    h_out, w_out = c.shape(c.out.shape[2:])
    y = c.emit(relax.call_tir(c.kernels[key], [x, c.weight("weight")],
                              out_ty=relax.TensorType([bsz, i64(cout), h_out, wp], dt)))
    if kernel[1] == 1 and before[1] == after[1] == 0:
        return y  # the padded width is the output's
    return c.emit(R.strided_slice(y, axes=[3], begin=[i64(0)], end=[w_out], assume_inbound=True))


def _conv(n: int) -> Lowering:
    """conv1d/conv2d: implicit GEMM (grouped: im2col + matmul) on CPU targets, Relax conv (NCW/NCHW,
    OIW/OIHW weights) on GPUs, plus the bias; padding 'same' as torch pads it (the odd one of an uneven
    total after the data)."""
    conv = R.nn.conv1d if n == 1 else R.nn.conv2d

    def lower(c: Ctx, xs: list) -> relax.Expr:
        kernel = _tuple(c.a("kernel"), n)
        stride, dilation = _tuple(c.a("stride"), n), _tuple(c.a("dilation"), n)
        padding = c.a("padding")
        if padding == "valid":
            padding = 0
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            before, after = [t // 2 for t in total], [t - t // 2 for t in total]
        else:
            before = after = list(_tuple(padding, n))
        impl = CONV_IMPL if CONV_IMPL != "auto" else ("implicit" if c.target_kind == "llvm" else "relax")
        if impl == "implicit" and int(c.a("groups")) == 1:
            y = _conv_gemm(c, xs[0], kernel, stride, dilation, before, after)
        elif impl in ("implicit", "im2col"):
            y = _im2col_conv(c, xs[0], n, kernel, stride, dilation, before, after, int(c.a("groups")))
        else:
            y = c.emit(conv(xs[0], c.weight("weight"), strides=stride, padding=tuple(before + after),
                            dilation=dilation, groups=int(c.a("groups"))))
        if c.has_weight("bias"):
            b = c.emit(R.reshape(c.weight("bias"), [-1] + [1] * n))
            y = R.add(y, b)
        return y

    return lower


def _batch_norm(c: Ctx, xs: list) -> relax.Expr:
    """Inference batch norm from the running statistics: x * scale + shift per channel (dimension 1), with
    scale = weight / sqrt(running_var + eps) and shift = bias - running_mean * scale (weights only: with
    LiftTransformParams they are computed once, when the weights are bound)."""
    rank = c.in_type(0).rank
    eps = c.const(float(c.a("eps")))
    scale = c.emit(R.divide(c.const(1.0), R.sqrt(R.add(c.weight("running_var"), eps))))
    if c.a("affine"):
        scale = c.emit(R.multiply(c.weight("weight"), scale))
    shift = c.emit(R.negative(R.multiply(c.weight("running_mean"), scale)))
    if c.a("affine"):
        shift = c.emit(R.add(c.weight("bias"), shift))
    view = [-1] + [1] * (rank - 2)
    if rank > 2:
        scale, shift = c.emit(R.reshape(scale, view)), c.emit(R.reshape(shift, view))
    return R.add(R.multiply(xs[0], scale), shift)


def _nan_max_pool(c: Ctx, x: relax.Expr, kernel: Sequence[int], stride: Sequence[int],
                  padding: Sequence[int]) -> relax.Expr:
    """A float max pool whose window maximum is nan where the window holds a nan (torch's max pools; Relax's
    drops it), padded positions -inf: one kernel, the window a reduction."""
    shape, n, dtype = c.shape(c.out.shape), len(kernel), c.dtype
    reducer = _nan_reducer("maximum")

    def kern(a: te.Tensor) -> te.Tensor:
        taps = [te.reduce_axis((0, k), name=f"r{d}") for d, k in enumerate(kernel)]

        def at(b: Any, ch: Any, *o: Any) -> Any:
            pos = [o[d] * stride[d] + taps[d] - padding[d] for d in range(n)]
            inside = tirx.all(*(tirx.And(p >= 0, p < a.shape[2 + d]) for d, p in enumerate(pos)))
            v = tirx.if_then_else(inside, a[(b, ch, *pos)], tirx.const(float("-inf"), dtype))
            return reducer(v, axis=taps)

        return te.compute(shape, at, name="T_max_pool")

    return c.bb.emit_te(kern, x, primfunc_name_hint=f"max_pool{n}d")


def _pool(kind: str, n: int) -> Lowering:
    """max/avg pools 1d/2d, floor mode; padded positions: -inf for max, zeros counted in the mean (torch's
    count_include_pad). A float max pool keeps a nan (`_nan_max_pool`)."""
    fn = {("max", 1): R.nn.max_pool1d, ("max", 2): R.nn.max_pool2d,
          ("avg", 1): R.nn.avg_pool1d, ("avg", 2): R.nn.avg_pool2d}[kind, n]

    def lower(c: Ctx, xs: list) -> relax.Expr:
        kernel = _tuple(c.a("kernel"), n)
        stride = kernel if c.a("stride") is None else _tuple(c.a("stride"), n)
        padding = _tuple(c.a("padding"), n)
        if kind == "max" and c.out.dtype in _FLOATS and _nan_mode(c) == "kernel":
            return _nan_max_pool(c, xs[0], kernel, stride, padding)
        extra = {"count_include_pad": True} if kind == "avg" else {}
        pooled = fn(xs[0], pool_size=kernel, strides=stride, padding=padding + padding, **extra)
        if kind == "max" and c.out.dtype in _FLOATS and _nan_mode(c) == "portable":
            seen = c.emit(fn(c.emit(R.astype(c.emit(_isnan(c, xs[0])), c.dtype)), pool_size=kernel, strides=stride,
                             padding=padding + padding))
            return _nan_where(c, seen, c.emit(pooled))
        return pooled

    return lower


def _adaptive_avg_pool2d(c: Ctx, xs: list) -> relax.Expr:
    return R.nn.adaptive_avg_pool2d(xs[0], output_size=_tuple(c.a("size"), 2))


def _upsample(c: Ctx, xs: list) -> relax.Expr:
    """nearest: each value repeated `scale` times along each spatial axis (torch's 'nearest' for an integer
    factor); linear/bilinear: resize2d with half-pixel centres (torch's align_corners=false)."""
    x, scale, mode = xs[0], int(c.a("scale")), c.a("mode")
    xt = c.in_type(0)
    if mode == "nearest":
        for axis in range(2, xt.rank):
            x = c.emit(R.repeat(x, scale, axis=axis))
        return x
    if mode not in ("linear", "bilinear"):
        raise LoweringError(f"upsample: no lowering for mode '{mode}'")
    out = c.shape(c.out.shape)
    if xt.rank == 3:  # [B, C, L] as an image of height 1
        img = c.emit(R.expand_dims(x, [2]))
        y = c.emit(R.image.resize2d(img, (tirx.IntImm("int64", 1), out[2]), method="linear",
                                    coordinate_transformation_mode="half_pixel"))
        return R.squeeze(y, [2])
    return R.image.resize2d(x, (out[2], out[3]), method="linear", coordinate_transformation_mode="half_pixel")


# -- comparisons, selection, masks ----------------------------------------------------------------

def _compare(fn: Callable[[relax.Expr, relax.Expr], relax.Expr]) -> Lowering:
    """Both operands converted to their common dtype (the IR's promotion rule), then compared; bools as int8
    (TVM's LLVM codegen emits a float comparison for bool operands, which LLVM rejects)."""

    def lower(c: Ctx, xs: list) -> relax.Expr:
        from specc.compiler.ops import promote

        common = DTYPES[promote(c.in_type(0).dtype, c.in_type(1).dtype)]
        if common == "bool":
            common = "int8"
        return fn(_cast(c, xs[0], common), _cast(c, xs[1], common))

    return lower


def _where(c: Ctx, xs: list) -> relax.Expr:
    return R.where(xs[0], _cast(c, xs[1], c.dtype), _cast(c, xs[2], c.dtype))


def _masked_fill(c: Ctx, xs: list) -> relax.Expr:
    value = c.a("value")
    if c.out.dtype not in ("f16", "bf16", "f32", "f64"):
        value = int(value)
    return R.where(xs[1], c.const(value), xs[0])


def _triangle(fn: Callable) -> Lowering:
    def lower(c: Ctx, xs: list) -> relax.Expr:
        k = int(c.a("diagonal") or 0)
        if c.out.dtype == "bool":  # TVM's trilu fills with a zero of the input's dtype: go through int8
            return R.astype(c.emit(fn(c.emit(R.astype(xs[0], "int8")), k)), "bool")
        return fn(xs[0], k)

    return lower


def _filled(fn: Callable) -> Lowering:
    return lambda c, xs: fn(c.shape(c.a("shape")), c.dtype)


def _float_zeros(c: Ctx, xs: list) -> relax.Expr:
    """zeros(...): of floats, a [1, ..., 1] constant broadcast, which kernels read from a buffer. R.zeros
    is an immediate 0 that fusion inlines into its consumers, where TIR's simplifier folds 0 * y to 0,
    0 + y to y and 0 - y to -y, when torch's IEEE arithmetic gives nan for an inf or nan y, +0.0 for
    0 + -0.0 and 0 - 0.0 (what _opaque_zero does for a literal 0)."""
    shape = c.shape(c.a("shape"))
    if c.out.dtype not in _FLOATS or c.out.rank == 0:
        return R.zeros(shape, c.dtype)
    return R.broadcast_to(_opaque_zero(c, c.const(0.0)), shape)


def _rotary(c: Ctx, xs: list) -> relax.Expr:
    """Rotary position embedding, "rotate half" layout (as backends/pytorch's apply_rotary):
    y = x * cos(a) + concat(-x2, x1) * sin(a), a = positions * base ** (-2i / d), angles in float32 or wider."""
    x = xs[0]
    xt = c.in_type(0)
    d = int(xt.shape[-1])
    half = d // 2
    t_len = c.dim(xt.shape[-2])
    adt = "float64" if c.dtype == "float64" else "float32"
    base = float(c.a("base"))
    inv = 1.0 / (np.float64(base) ** (np.arange(0, d, 2, dtype=np.float64) / d))
    inv_freq = relax.const(inv.astype(adt), adt)  # [d/2]
    if c.a("positions?"):
        pos = _cast(c, xs[1], adt)
        pos_rank = c.in_type(1).rank
    else:
        pos = c.emit(R.arange(0, t_len, 1, dtype=adt))
        pos_rank = 1
    angles = c.emit(R.multiply(c.emit(R.expand_dims(pos, [-1])), inv_freq))  # [T, d/2] or [B, T, d/2]
    if pos_rank == 2 and xt.rank > 3:  # per batch row: [B, 1.., T, d/2]
        angles = c.emit(R.expand_dims(angles, list(range(1, xt.rank - 2))))
    angles = c.emit(R.concat([angles, angles], axis=-1))
    cos = _cast(c, c.emit(R.cos(angles)), c.dtype)
    sin = _cast(c, c.emit(R.sin(angles)), c.dtype)
    parts = c.emit(R.split(x, [tirx.IntImm("int64", half)], axis=-1))
    x1, x2 = c.emit(relax.TupleGetItem(parts, 0)), c.emit(relax.TupleGetItem(parts, 1))
    rot = c.emit(R.concat([c.emit(R.negative(x2)), x1], axis=-1))
    return R.add(c.emit(R.multiply(x, cos)), c.emit(R.multiply(rot, sin)))


# -- selection, geometry, mixture of experts -------------------------------------------------------

def _axes_of(c: Ctx, rank: int) -> list[int]:
    dims = c.a("dim")
    if dims is None:
        return list(range(rank))
    return sorted(_axis(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims]))


def _cumsum(c: Ctx, xs: list) -> relax.Expr:
    """Running sums along dim in the result's dtype (i64 for integers and bools, as torch; float16 and
    bfloat16 added up in float32); reverse: of x flipped along it, flipped back."""
    rank = c.in_type(0).rank
    axis = _axis(c.a("dim"), rank)
    x = xs[0] if c.in_type(0).dtype != "bool" else c.emit(R.astype(xs[0], "int64"))
    # (on GPUs, along the last axis: TIR's lowering of the CUDA scan over another axis divides by zero)
    order = None if c.target_kind == "llvm" or axis == rank - 1 else \
        [a for a in range(rank) if a != axis] + [axis]
    if order is not None:
        x = c.emit(R.permute_dims(x, order))
    at = axis if order is None else rank - 1
    if c.a("reverse"):
        x = c.emit(R.flip(x, at))
    if c.dtype in _HALF:  # added up in float32 (torch's accumulation), rounded once
        y = c.emit(R.astype(c.emit(R.cumsum(c.emit(R.astype(x, "float32")), axis=at, dtype="float32")), c.dtype))
    else:
        y = c.emit(R.cumsum(x, axis=at, dtype=c.dtype))
    if c.a("reverse"):
        y = c.emit(R.flip(y, at))
    return y if order is None else R.permute_dims(y, [order.index(a) for a in range(rank)])


def _argmax_combine(a: Any, b: Any) -> Any:
    """Of two (index, value) pairs, the one torch's argmax keeps: a nan first (it counts as the largest),
    else the larger value, on a tie the smaller index."""
    (ia, va), (ib, vb) = a, b
    na, nb = _tir_isnan(va), _tir_isnan(vb)
    first = tirx.Select(na, tirx.Or(tirx.Not(nb), ia < ib),
                        tirx.And(tirx.Not(nb), tirx.Or(va > vb, tirx.And(va == vb, ia < ib))))
    return tirx.Select(first, ia, ib), tirx.Select(first, va, vb)


def _argmax(c: Ctx, xs: list) -> relax.Expr:
    """The first index of the largest value, as i64: for integers Relax's argmax (it keeps the smaller index on
    ties, as torch); for floats a kernel that also takes a nan as the largest value, as torch does."""
    rank = c.in_type(0).rank
    axis, keep = _axis(c.a("dim"), rank), bool(c.a("keepdim"))
    if c.in_type(0).dtype not in _FLOATS or _nan_mode(c) != "kernel":
        index = _cast(c, c.emit(R.argmax(xs[0], axis=axis, keepdims=keep)), "int64")
        if _nan_mode(c) == "drop" or c.in_type(0).dtype not in _FLOATS:
            return index
        nans = c.emit(R.astype(c.emit(_isnan(c, xs[0])), "int8"))  # the first nan, where there is one
        first = _cast(c, c.emit(R.argmax(nans, axis=axis, keepdims=keep)), "int64")
        seen = c.emit(R.max(nans, axis=axis, keepdims=keep))
        return R.where(c.emit(R.greater(seen, relax.const(0, "int8"))), first, index)
    reducer = te.comm_reducer(_argmax_combine, lambda ti, tv: (tirx.max_value(ti), tirx.const(float("-inf"), tv)),
                              name="nan_argmax")
    shape = c.shape(c.out.shape)
    x = xs[0]
    if c.in_type(0).dtype == "bf16":  # the combiner's bfloat16 values do not type-check; float32 holds them exactly
        x = c.emit(R.astype(x, "float32"))

    def kernel(x: te.Tensor) -> te.Tensor:
        k = te.reduce_axis((0, x.shape[axis]), name="k")

        def at(*i: Any) -> Any:
            i = list(i)
            pos = i[:axis] + [k] + i[axis + (1 if keep else 0):]
            return reducer((k.astype("int64"), x[tuple(pos)]), axis=k)

        return te.compute(shape, at, name="T_argmax")[0]

    return c.bb.emit_te(kernel, x, primfunc_name_hint="argmax")


def _gather(c: Ctx, xs: list) -> relax.Expr:
    """gather_elements, which reads outside x for an index outside its dimension: an index whose range
    the IR does not prove inside is first clamped to it, so no index reads past the tensor (torch raises
    IndexError there; the runner checks the inputs that index tables, `build.index_ranges`)."""
    axis = _axis(c.a("dim"), c.in_type(0).rank)
    index = _cast(c, xs[1], "int64")
    n, known = c.in_type(0).shape[axis], c.in_type(1).value_range
    if not (isinstance(n, int) and known is not None and known[0] >= 0 and known[1] <= n):
        def clamped(i: te.Tensor, x: te.Tensor) -> te.Tensor:
            top = tirx.Cast("int64", x.shape[axis]) - 1
            return te.compute(i.shape, lambda *k: tirx.max(tirx.min(i(*k), top), tirx.const(0, "int64")),
                              name="T_index_clamp")

        index = c.bb.emit_te(clamped, index, xs[0], primfunc_name_hint="index_clamp")
    return R.gather_elements(xs[0], index, axis=axis)


def _unsqueeze(c: Ctx, xs: list) -> relax.Expr:
    return R.expand_dims(xs[0], [int(c.a("dim")) % (c.in_type(0).rank + 1)])


def _rot90(c: Ctx, xs: list) -> relax.Expr:
    """torch.rot90: k = 1 flips dims[1] then swaps the two; k = 2 flips both; k = 3 flips dims[0] then swaps."""
    rank = c.in_type(0).rank
    a, b = (_axis(d, rank) for d in c.a("dims"))
    k = int(c.a("k")) % 4
    x = xs[0]
    swap = list(range(rank))
    swap[a], swap[b] = b, a
    if k == 1:
        return R.permute_dims(c.emit(R.flip(x, b)), swap)
    if k == 2:
        return R.flip(c.emit(R.flip(x, a)), b)
    if k == 3:
        return R.permute_dims(c.emit(R.flip(x, a)), swap)
    return x


def _moe_mlp(c: Ctx, xs: list) -> relax.Expr:
    """Every expert's MLP on every token ([..., experts, out]), then each token's own expert picked by
    its route (gather along the experts axis): exact, at `experts` times the FLOPs of one MLP."""
    x, route = xs
    xt = c.in_type(0)
    e, hidden = int(c.a("experts")), int(c.a("hidden"))
    d, out = int(xt.shape[-1]), int(c.out.shape[-1])
    i64 = lambda n: tirx.IntImm("int64", n)  # noqa: E731
    batch = c.shape(xt.shape[:-1])
    bias = bool(c.a("bias"))
    w1 = c.emit(R.reshape(c.weight("fc1.weight"), [i64(e * hidden), i64(d)]))
    b1 = c.emit(R.reshape(c.weight("fc1.bias"), [i64(e * hidden)])) if bias else None
    h = _linear(c, x, w1, b1, "moe_fc1")  # [..., e * hidden]
    h = _act(c, c.a("act"), c.emit(R.reshape(h, batch + [i64(e), i64(1), i64(hidden)])))
    w2t = c.emit(R.permute_dims(c.weight("fc2.weight"), [0, 2, 1]))  # [e, hidden, out]
    y = c.emit(R.matmul(h, w2t))  # [..., e, 1, out]
    y = c.emit(R.reshape(y, batch + [i64(e), i64(out)]))
    if bias:
        y = c.emit(R.add(y, c.weight("fc2.bias")))
    idx = c.emit(R.expand_dims(_cast(c, route, "int64"), [-1, -2]))  # [..., 1, 1]
    idx = c.emit(R.broadcast_to(idx, batch + [i64(1), i64(out)]))
    return R.squeeze(c.emit(R.gather_elements(y, idx, axis=len(batch))), [len(batch)])


LOWERINGS: dict[str, Lowering] = {
    "input": _input,
    "scalar": _scalar,
    "arange": _arange,
    "cast": _cast_op,
    "relu": _relu_op,
    "sin": _unary(R.sin),
    "cos": _unary(R.cos),
    "rsqrt": _unary(R.rsqrt),
    "erf": lambda c, xs: _keep_nan(c, xs[0], R.erf(xs[0])),  # (TVM's erf clamps x to [-4, 4] first: nan -> 1)
    "floor": _unary(R.floor),
    "ceil": _unary(R.ceil),
    "round": _unary(R.round),
    "sign": _sign,
    "softplus": lambda c, xs: _softplus(c, xs[0], float(c.a("beta")), float(c.a("threshold"))),
    "leaky_relu": lambda c, xs: _leaky_relu(c, xs[0], float(c.a("negative_slope"))),
    "elu": lambda c, xs: _elu(c, xs[0], float(c.a("alpha"))),
    "hardswish": lambda c, xs: _hardswish(c, xs[0]),
    "mish": lambda c, xs: _mish(c, xs[0]),
    "gelu": _gelu,
    "silu": _unary(R.nn.silu),
    "tanh": lambda c, xs: _tanh(c, xs[0]),
    "sigmoid": _unary(R.sigmoid),
    "exp": _unary(R.exp),
    "log": _unary(R.log),
    "sqrt": _unary(R.sqrt),
    "abs": _unary(R.abs),
    "neg": _unary(R.negative),
    "add": _additive(R.add),
    "sub": _additive(R.subtract),
    "mul": _mul,
    "div": _divide,
    "pow": _pow,
    "floordiv": _floor_op("floordiv"),
    "mod": _floor_op("mod"),
    "matmul": _matmul,
    "linear": _linear_op,
    "embedding": _embedding,
    "parameter": lambda c, xs: c.weight("weight"),
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "dropout": _dropout,
    "attention": _attention,
    "mlp": _mlp,
    "lstm": _recurrent("lstm"),
    "gru": _recurrent("gru"),
    "softmax": _softmax,
    "mean": _reduce(R.mean),
    "sum": _reduce(R.sum),
    "transpose": _transpose,
    "permute": _permute,
    "reshape": _reshape,
    "expand": lambda c, xs: R.broadcast_to(xs[0], c.shape(c.out.shape)),  # the output type has -1 resolved
    "concat": _concat,
    "stack": _stack,
    "flip": _flip,
    "split": _split,
    "getitem": _getitem,
    "one_hot": _one_hot,
    "conv1d": _conv(1),
    "conv2d": _conv(2),
    "batch_norm": _batch_norm,
    "max_pool1d": _pool("max", 1),
    "max_pool2d": _pool("max", 2),
    "avg_pool1d": _pool("avg", 1),
    "avg_pool2d": _pool("avg", 2),
    "adaptive_avg_pool2d": _adaptive_avg_pool2d,
    "upsample": _upsample,
    "eq": _compare(R.equal),
    "ne": _compare(R.not_equal),
    "lt": _compare(R.less),
    "le": _compare(R.less_equal),
    "gt": _compare(R.greater),
    "ge": _compare(R.greater_equal),
    "logical_and": lambda c, xs: R.logical_and(xs[0], xs[1]),
    "logical_or": lambda c, xs: R.logical_or(xs[0], xs[1]),
    "logical_not": lambda c, xs: R.logical_not(xs[0]),
    "where": _where,
    "maximum": _extremum("maximum"),
    "minimum": _extremum("minimum"),
    "clamp": _clamp,
    "masked_fill": _masked_fill,
    "tril": _triangle(R.tril),
    "triu": _triangle(R.triu),
    "ones": _filled(R.ones),
    "zeros": _float_zeros,
    "rotary": _rotary,
    "attend": _attend,
    "grad_reverse": lambda c, xs: xs[0],  # the identity forward (it reverses gradients only)
    "detach": lambda c, xs: xs[0],  # the identity forward (it stops gradients only)
    "cumsum": _cumsum,
    "amax": _nan_reduce("maximum"),
    "amin": _nan_reduce("minimum"),
    "argmax": _argmax,
    "gather": _gather,
    "unsqueeze": _unsqueeze,
    "rot90": _rot90,
    "moe_mlp": _moe_mlp,
}

#: Registered ops this backend does not lower (yet).
UNSUPPORTED: frozenset[str] = frozenset({
})


# ---------------------------------------------------------------------------------------------
# the driver: a whole graph -> an IRModule with one Relax function
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Signature:
    """How to call the compiled function: data inputs first, then the weights, by name."""

    inputs: tuple[tuple[str, TensorType], ...]
    params: tuple[tuple[str, ParamSpec], ...]
    outputs: tuple[tuple[str, TensorType], ...]
    dims: tuple[str, ...]  # the symbolic dimensions, each read from an input shape


def parameters(graph: Graph) -> list[tuple[str, ParamSpec]]:
    """The graph's stored parameters in weights order (tied parameters once, at their owner)."""
    out = []
    for _, node in graph.nodes():
        for p in node.params:
            if p.tied_to is None:
                out.append((".".join(node.path + (p.name,)), p))
    return out


@dataclass(frozen=True)
class InputShapes:
    """How the function's inputs define the spec's symbols. A symbol that is a whole input dimension
    somewhere is a size variable of the function. One that appears only as a * S + b (an image side
    4 * Hq that pools twice, say; b, or a, may hold symbols the inputs give too: 2 * T + H) is
    (v - b) // a of a variable v the function takes for that axis;
    such an input (and one with an axis whose expression uses symbols defined elsewhere) is reshaped
    once inside the function to its shape in the spec's symbols. The sizes must fit: the runner
    checks them before it calls the function."""

    syms: dict[str, Any]  # symbol -> its tirx.Var, or (v - b) // a of an axis variable
    annotations: dict[int, list[Any]]  # input node -> the shape its parameter is declared with
    derived: dict[str, Dim]  # axis variable name -> the dimension it is (a * S + b, 2 * T + H, ...)
    checked: frozenset[int]  # input nodes reshaped to their shape in the spec's symbols inside the function


def input_shapes(graph: Graph) -> InputShapes:
    syms: dict[str, Any] = {}
    for _, nid in graph.inputs:  # plain symbols first: where a symbol is a whole dimension, it is a variable
        for name in filter(None, map(symbol_name, graph.node(nid).type.shape)):
            syms.setdefault(name, tirx.Var(name, "int64"))
    annotations: dict[int, list[Any]] = {}
    derived: dict[str, Dim] = {}
    checked = set()
    where: dict[str, tuple[str, int, int]] = {}  # axis variable name -> (input, axis, its node)
    for name, nid in graph.inputs:
        shape = []
        for axis, d in enumerate(graph.node(nid).type.shape):
            if not isinstance(d, Sym) or symbol_name(d):
                shape.append(dim_expr(d, syms) if isinstance(d, Sym) else tirx.IntImm("int64", d))
                continue
            v = tirx.Var(f"{_hint(name)}__{axis}", "int64")
            shape.append(v)
            checked.add(nid)
            if not all(isinstance(syms.get(x), tirx.Var) for x in d.symbols):  # not only whole dimensions (B * T)
                derived[v.name], where[v.name] = d, (name, axis, nid)
        annotations[nid] = shape
    variables = {v.name: v for shape in annotations.values() for v in shape if isinstance(v, tirx.Var)}
    names = list(derived)
    for i, sym, a, rest in solve_all([derived[n] for n in names], syms):  # S of a * S + rest: (v - rest) // a
        v = variables[names[i]]
        size = v - dim_expr(rest, syms) if rest != 0 else v
        syms[sym] = tirx.floordiv(size, dim_expr(a, syms)) if a != 1 else size
    for vname, d in derived.items():
        if not d.symbols <= set(syms):
            name, axis, nid = where[vname]
            raise LoweringError(f"input '{name}': dimension {axis} is the expression {d}; the TVM backend takes an "
                                f"input dimension that is a symbol, a * S + b, or an expression of symbols the "
                                f"inputs give (whole, or solved from such a dimension)", graph.node(nid).span)
    return InputShapes(syms, annotations, derived, frozenset(checked))


def _symbols(graph: Graph) -> dict[str, Any]:
    """The spec's symbols as the TIR expressions the lowered function computes them by."""
    return input_shapes(graph).syms


_VAR = re.compile(r"[^A-Za-z0-9_]")


def _hint(text: str) -> str:
    return _VAR.sub("_", text)[:40] or "v"


def to_relax(graph: Graph, target_kind: str = "llvm", func_name: str = "main",
             lanes: int = 16) -> tuple[tvm.IRModule, Signature]:
    """The IRModule of `graph`: one Relax function `func_name`(*inputs, *weights) -> output(s).
    `lanes`: float32 lanes of a CPU target's vector registers (16 on AVX-512, 8 on AVX2)."""
    shapes = input_shapes(graph)
    syms = shapes.syms
    bb = relax.BlockBuilder()
    in_vars = []
    for name, nid in graph.inputs:
        in_vars.append(relax.Var(_hint(name), relax.TensorType(shapes.annotations[nid],
                                                               DTYPES[graph.node(nid).type.dtype])))
    params = parameters(graph)
    weights: dict[str, relax.Var] = {}
    for full, p in params:
        weights[full] = relax.Var(_hint(full), relax.TensorType(list(p.shape), DTYPES[p.dtype]))
    env: dict[Ref, relax.Expr] = {}
    kernels: dict[Any, tvm.ir.GlobalVar] = {}
    attrs = {"num_input": len(in_vars)}
    bounds = {s: hi for s, (_, _, hi) in graph.dims.items() if hi is not None and isinstance(syms.get(s), tirx.Var)}
    for v, d in shapes.derived.items():  # the largest size: every symbol at its largest (a sum of non-negative terms)
        his = {s: graph.dims.get(s, (None, None, None))[2] for s in d.symbols}
        if None not in his.values() and all(c >= 0 for m, c in d.terms if m):
            bounds[v] = evaluate(d, his)
    if bounds:
        attrs["tir_var_upper_bound"] = bounds
    with bb.function(func_name, in_vars + list(weights.values()), attrs=attrs):
        with bb.dataflow():
            for (name, nid), v in zip(graph.inputs, in_vars):
                # an axis given as a * S + b (or B * T): the input, seen in the spec's symbols: a crop of those
                # axes to their sizes in the symbols, the same sizes (the runner checks that they fit before it
                # calls the function). Not a match_cast: the lifting of weight transforms refuses a match_cast.
                # Not a reshape: its flat index, floordiv/floormod nested by the symbolic sizes, took TVM's
                # LLVM codegen (the simplifier on the lowered divisions) over a minute; the crop fuses.
                if nid in shapes.checked:
                    shape = graph.node(nid).type.shape
                    axes = [i for i, d in enumerate(shape) if isinstance(d, Sym) and not symbol_name(d)]
                    env[Ref(nid, 0)] = bb.emit(R.strided_slice(v, axes, [0] * len(axes),
                                                               [dim_expr(shape[i], syms) for i in axes],
                                                               assume_inbound=True), _hint(name))
                else:
                    env[Ref(nid, 0)] = v
            for nid, node in graph.nodes():
                if node.op == "input":
                    continue
                lower = LOWERINGS.get(node.op)
                if lower is None:
                    raise LoweringError(f"the TVM backend has no lowering for op '{node.op}'")
                ctx = Ctx(bb, graph, nid, node, syms, weights, target_kind, kernels, lanes)
                result = lower(ctx, [env[r] for r in node.inputs])
                results = result if isinstance(result, tuple) else (result,)
                if len(results) != len(node.outputs):
                    raise LoweringError(f"{node.op}: lowered to {len(results)} values, expected "
                                        f"{len(node.outputs)}")
                for i, r in enumerate(results):
                    if not isinstance(r, (relax.Var, tvm.ir.expr.Constant)):
                        r = bb.emit(r, _hint(node.name or node.op))
                    env[Ref(nid, i)] = r
            outs = [env[ref] for _, ref in graph.outputs]
            result = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(result)
    mod = bb.finalize()
    sig = Signature(
        inputs=tuple((name, graph.node(nid).type) for name, nid in graph.inputs),
        params=tuple(params),
        outputs=tuple((name, graph.type_of(ref)) for name, ref in graph.outputs),
        dims=tuple(syms),
    )
    return mod, sig


__all__ = ["LOWERINGS", "UNSUPPORTED", "Ctx", "LoweringError", "Signature", "to_relax", "parameters", "input_shapes",
           "lstm_kernel", "lstm_kernel_gpu", "gru_kernel", "gru_kernel_gpu", "recurrent_kernel", "recurrent_kernel_gpu",
           "dim_expr"]

from . import lowering_flow  # noqa: E402  (warp, splat, correlation)
LOWERINGS.update(lowering_flow.LOWERINGS)
from . import lowering_memory  # noqa: E402  (omega_memory)
LOWERINGS.update(lowering_memory.LOWERINGS)
