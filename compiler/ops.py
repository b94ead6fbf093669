"""The operators of specc, each declared once: signature, shape and dtype rule, parameters, FLOPs.

Conventions: FLOPs count a multiply-add as 2; elementwise ops count one per output element;
parameter initialisers follow PyTorch's defaults so generated modules behave like hand-written ones.
"""

from __future__ import annotations

import dataclasses
import math

from .dims import Dim, Sym, div_exact, fmt, is_dim, product, symbol_name, symbols
from .ir import FLOAT_DTYPES, INT_DTYPES, INT_RANGES, Init, TensorType, slice_step
from .registry import Arg, OpCall, OpError, op, param, uniform_fan_in

T = TensorType

#: Bounds on counts that make an op build lists (parts, layers): a spec is untrusted input.
MAX_PARTS = 4096
MAX_LAYERS = 1024


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def shape_str(t: TensorType) -> str:
    return str(TensorType(t.dtype, t.shape))


def dims_str(shape) -> str:
    return "[" + ", ".join(fmt(d) for d in shape) + "]"


def norm_axis(axis: int, rank: int, op_name: str, arg: str = "dim", scalar_ok: bool = False) -> int:
    """axis counted from the front; scalar_ok: a rank-0 tensor takes dimension 0 or -1 (softmax, sum and
    flip of a scalar, as torch's: it counts a scalar as of rank 1 there), else it has none."""
    if rank == 0 and not scalar_ok:
        raise OpError(f"{op_name}: a scalar (rank 0) has no dimension {axis}", arg)
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise OpError(f"{op_name}: dimension {axis} is out of range for a rank-{rank} tensor", arg)
    return axis % rank if rank else 0


def need_float(t: TensorType, op_name: str, arg: str = "x") -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise OpError(f"{op_name}: expected a floating-point tensor for '{arg}', got {shape_str(t)}", arg)


def need_rank(t: TensorType, lo: int, op_name: str, arg: str = "x", hi: int | None = None) -> None:
    if t.rank < lo or (hi is not None and t.rank > hi):
        want = f"rank {lo}" if hi == lo else (f"rank >= {lo}" if hi is None else f"rank {lo} to {hi}")
        raise OpError(f"{op_name}: expected a tensor of {want} for '{arg}', got {shape_str(t)}", arg)


def fixed_width(d: Dim, op_name: str, what: str, arg: str = "x") -> int:
    if not isinstance(d, int):
        raise OpError(f"{op_name}: the {what} must be a fixed size, but it is the symbolic dimension {d}", arg)
    return d


def broadcast(a: TensorType, b: TensorType, op_name: str) -> tuple[Dim, ...]:
    out: list[Dim] = []
    n = max(a.rank, b.rank)
    for i in range(1, n + 1):
        da = a.shape[-i] if i <= a.rank else 1
        db = b.shape[-i] if i <= b.rank else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise OpError(f"{op_name}: cannot broadcast {shape_str(a)} with {shape_str(b)}: "
                          f"dimension -{i} is {fmt(da)} vs {fmt(db)}", "y")
    return tuple(reversed(out))


def promote(a: str, b: str, op_name: str = "", arg: str = "y") -> str:
    """The dtype of an elementwise op of dtypes a and b, as torch's type promotion gives it; u8 with i8
    (int16 in torch, a dtype specc has not) is an OpError at `arg`."""
    if a == b:
        return a
    if {a, b} == {"u8", "i8"}:
        raise OpError(f"{op_name}: u8 and i8 combine to int16 in torch, which specc has no dtype for: cast one of "
                      f"them first, e.g. cast(x, i32)", arg)
    order = ["bool", "u8", "i8", "i32", "i64", "f16", "bf16", "f32", "f64"]
    if {a, b} == {"f16", "bf16"}:
        return "f32"
    return max(a, b, key=order.index)


def numel(t: TensorType) -> Dim:
    return t.numel()


def elementwise_flops(c: OpCall, outs) -> Dim:
    return numel(outs[0])


# ---------------------------------------------------------------------------------------------
# inputs and constants
# ---------------------------------------------------------------------------------------------

@op("input", Arg("type", "any"), Arg("name", "str"), category="internal")
def _input(c: OpCall):
    """A graph input."""
    return c.a("type")


@op("scalar", Arg("value", "number"), Arg("dtype", "dtype", "f32"), category="internal")
def _scalar(c: OpCall):
    """A constant scalar (a 0-d tensor), e.g. the 0.5 in `x * 0.5`."""
    return T(c.a("dtype"), ())


@op("arange", Arg("n", "dim"), Arg("dtype", "dtype", "i64"), flops=lambda c, o: 0)
def _arange(c: OpCall):
    """arange(n): the integers 0..n-1 (positions), as i64[n]."""
    n = c.a("n")
    hi = n if isinstance(n, int) else _max_of(n, c)
    return T(c.a("dtype"), (n,), (0, hi) if hi is not None else None)


def _max_of(d: Dim, c: OpCall) -> int | None:
    lo_hi = c.bounds.get(symbol_name(d)) if symbol_name(d) else None
    return lo_hi[1] if lo_hi else None


def min_of(d: Dim, c: OpCall) -> int | None:
    """The least value of d over the symbols' declared bounds (a lower bound of it: each term at its least),
    None where a term has no least value (a negative coefficient on a symbol without a maximum)."""
    if isinstance(d, int):
        return d
    total = 0
    for mono, coef in d.terms:
        value = coef
        for s in mono:
            lo, hi = c.bounds.get(s, (1, None))
            pick = lo if coef > 0 else hi
            if pick is None:
                return None
            value *= pick
        total += value
    return total


def _index_bound_error(n: Dim, need: int, axis: int, what: str, x: TensorType, c: OpCall) -> OpError | None:
    """The error of an index that needs dimension `axis` (n, symbolic) to be at least `need` where the
    symbols' bounds allow less: torch would clamp the slice (or raise) and the declared type be wrong."""
    least = min_of(n, c)
    if least is not None and least >= need:
        return None
    name = symbol_name(n)
    allowed = f"{fmt(n)} may be {least}" if least is not None else f"{fmt(n)} has no least size above it"
    hint = (f"; declare {name}: {{min: {need}}} in dims" if name else f"; give its symbols minimums (dims: "
            f"{{S: {{min: ..}}}}) that make it at least {need}")
    return OpError(f"index: {what} needs dimension {axis} of {shape_str(x)} to be at least {need}, but "
                   f"{allowed}{hint}", f"index[{axis}]")


def _slice_bound_error(n: Dim, start: Dim, stop: Dim, axis: int, x: TensorType, c: OpCall) -> OpError | None:
    """The error of a slice with a symbolic bound (start, stop counted from the front) that the symbols'
    bounds allow outside 0 <= start <= stop <= n: torch would clamp it, and its length not be stop - start."""
    for what, gap in ((f"start {fmt(start)}", start), (f"stop {fmt(stop)}", n - stop),
                      (f"{fmt(start)}:{fmt(stop)}", stop - start)):
        least = min_of(gap, c)
        if least is None or least < 0:
            return OpError(f"index: slice {what} of dimension {axis} of {shape_str(x)} may lie outside 0 <= start "
                           f"<= stop <= {fmt(n)} at sizes the dims allow (torch would clamp it, and its length not "
                           f"be stop - start); declare minimums in dims that keep it inside, or slice with bounds "
                           f"that do", f"index[{axis}]")
    return None


@op("cast", Arg("x", "tensor"), Arg("dtype", "dtype"), flops=elementwise_flops)
def _cast(c: OpCall):
    """cast(x, dtype): convert to another dtype, e.g. cast(ids, f32)."""
    return T(c.a("dtype"), c.t("x").shape)


# ---------------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------------

def _unary(name: str, doc: str, float_only: bool = True, extra: tuple[Arg, ...] = (), cost: int = 1,
           positive: tuple[str, ...] = ()):
    """An elementwise op of x; `positive`: float arguments that must be > 0 (and finite)."""
    def infer(c: OpCall):
        x = c.t("x")
        if float_only:
            need_float(x, name)
        for arg in positive:
            v = c.a(arg)
            if not (0 < v < math.inf):
                raise OpError(f"{name}: {arg} must be a positive number, got {v}", arg)
        return x if x.value_range is None else T(x.dtype, x.shape)

    infer.__doc__ = doc
    op(name, Arg("x", "tensor"), *extra, flops=lambda c, o: cost * numel(o[0]), category="activation")(infer)


_unary("relu", "relu(x) = max(x, 0).")
_unary("gelu", "gelu(x, approximate='none'|'tanh').", extra=(Arg("approximate", "str", "none", ("none", "tanh")),),
       cost=8)
_unary("silu", "silu(x) = x * sigmoid(x).", cost=4)
_unary("tanh", "tanh(x).", cost=4)
_unary("sigmoid", "sigmoid(x).", cost=4)
_unary("exp", "exp(x).", cost=2)
_unary("log", "log(x).", cost=2)
_unary("sqrt", "sqrt(x).", cost=2)
_unary("abs", "abs(x).", float_only=False)
_unary("neg", "neg(x) = -x.", float_only=False)
_unary("sin", "sin(x).", cost=4)
_unary("cos", "cos(x).", cost=4)
_unary("rsqrt", "rsqrt(x) = 1 / sqrt(x).", cost=2)
_unary("erf", "erf(x): the error function.", cost=8)
_unary("floor", "floor(x): the largest integer value <= x (a float tensor).")
_unary("ceil", "ceil(x): the smallest integer value >= x (a float tensor).")
_unary("round", "round(x): the nearest integer value, halves to even (as torch.round: round(2.5) = 2).")
_unary("sign", "sign(x): 1, -1 or 0 by the sign of x (0 for 0, -0 and nan, as torch.sign).")
_unary("softplus", "softplus(x, beta=1.0, threshold=20.0) = log(1 + exp(beta * x)) / beta, and x where beta * x "
                   "> threshold (as torch's softplus).",
       extra=(Arg("beta", "float", 1.0), Arg("threshold", "float", 20.0)), cost=4, positive=("beta",))
_unary("leaky_relu", "leaky_relu(x, negative_slope=0.01) = x where x > 0, else negative_slope * x.",
       extra=(Arg("negative_slope", "float", 0.01),))
_unary("elu", "elu(x, alpha=1.0) = x where x > 0, else alpha * (exp(x) - 1).", extra=(Arg("alpha", "float", 1.0),),
       cost=3)
_unary("hardswish", "hardswish(x) = x * min(max(x + 3, 0), 6) / 6 (MobileNetV3).", cost=4)
_unary("mish", "mish(x) = x * tanh(softplus(x)).", cost=8)

#: The activations of mlp and moe_mlp (`act=`): the unary ops of those names at their default arguments
#: (leaky_relu's negative_slope 0.01, elu's alpha 1.0, softplus's beta 1.0 and threshold 20.0, gelu exact), and
#: identity. The other continuous unary ops are left out: sin and cos are periodic (a SIREN layer also needs
#: its frequency scale and initialisation, which mlp has no arguments for), erf is gelu's building block
#: rather than an activation.
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid", "softplus", "leaky_relu", "elu", "hardswish", "mish",
               "identity")


def _binary(name: str, doc: str):
    def infer(c: OpCall):
        x, y = c.t("x"), c.t("y")
        if (x.dtype == "bool") != (y.dtype == "bool") and name != "mul":
            raise OpError(f"{name}: cannot combine {shape_str(x)} and {shape_str(y)}", "y")
        if name in ("floordiv", "mod") and "bool" in (x.dtype, y.dtype):
            raise OpError(f"{name}: needs numbers, got {shape_str(x)} and {shape_str(y)}",
                          "x" if x.dtype == "bool" else "y")
        dtype = promote(x.dtype, y.dtype, name)
        if name == "div" and dtype not in FLOAT_DTYPES:
            dtype = "f32"
        return T(dtype, broadcast(x, y, name), _range_of(name, x, y, dtype))

    infer.__doc__ = doc
    op(name, Arg("x", "tensor"), Arg("y", "tensor"), flops=elementwise_flops, category="elementwise")(infer)


def _range_of(name: str, x: TensorType, y: TensorType, dtype: str) -> tuple[int, int] | None:
    """The value range of an integer add, sub or mul of two ranged integer tensors (interval
    arithmetic; ranges are half-open, range(lo, hi)), so that e.g. `domain[:, None] + zeros(B, T,
    dtype=i64)` still takes expert numbers. None where unknown or beyond int64."""
    if dtype not in INT_DTYPES or name not in ("add", "sub", "mul") or x.value_range is None \
            or y.value_range is None:
        return None
    (a, b), (c, d) = (x.value_range[0], x.value_range[1] - 1), (y.value_range[0], y.value_range[1] - 1)
    if name == "add":
        lo, hi = a + c, b + d
    elif name == "sub":
        lo, hi = a - d, b - c
    else:
        corners = (a * c, a * d, b * c, b * d)
        lo, hi = min(corners), max(corners)
    return (lo, hi + 1) if -2 ** 63 <= lo and hi < 2 ** 63 - 1 else None


_binary("add", "x + y, with broadcasting.")
_binary("sub", "x - y, with broadcasting.")
_binary("mul", "x * y, with broadcasting.")
_binary("div", "x / y, with broadcasting (true division; x / 0 is +-inf, 0 / 0 nan, as IEEE says).")
_binary("pow", "x ** y, with broadcasting.")
_binary("floordiv", "x // y, with broadcasting: floor(x / y), as torch's floor_divide (rounding_mode='floor'); "
                    "integers stay integers. An integer division by a constant zero is an error.")
_binary("mod", "x % y, with broadcasting: the remainder with the sign of y, as torch.remainder and Python's %; "
               "integers stay integers. An integer remainder by a constant zero is an error.")

BINARY_OPS = {"+": "add", "-": "sub", "*": "mul", "/": "div", "**": "pow", "//": "floordiv", "%": "mod"}


def _extremum(name: str, doc: str):
    pick = max if name == "maximum" else min

    def infer(c: OpCall):
        x, y = c.t("x"), c.t("y")
        if "bool" in (x.dtype, y.dtype):
            other = "logical_or" if name == "maximum" else "logical_and"
            raise OpError(f"{name}: needs numbers, got {shape_str(x)} and {shape_str(y)}; for bool tensors use "
                          f"{other}", "x" if x.dtype == "bool" else "y")
        dtype = promote(x.dtype, y.dtype, name)
        rng = None
        if dtype in INT_DTYPES and x.value_range is not None and y.value_range is not None:
            rng = (pick(x.value_range[0], y.value_range[0]), pick(x.value_range[1], y.value_range[1]))
        return T(dtype, broadcast_args(x, y, name, "x", "y"), rng)

    infer.__doc__ = doc
    op(name, Arg("x", "tensor"), Arg("y", "tensor"), flops=elementwise_flops, category="elementwise")(infer)


_extremum("maximum", "maximum(x, y): the larger of x and y per element, with broadcasting, as torch.maximum: nan "
                     "where either is nan; y may be a number, e.g. maximum(x, 0.0).")
_extremum("minimum", "minimum(x, y): the smaller of x and y per element, with broadcasting, as torch.minimum: nan "
                     "where either is nan; y may be a number.")


@op("clamp", Arg("x", "tensor"), Arg("min", "number", None), Arg("max", "number", None), flops=elementwise_flops,
    category="elementwise")
def _clamp(c: OpCall):
    """clamp(x, min=none, max=none): x limited to [min, max] per element, as torch.clamp (nan stays nan); one
    bound may be left out. An integer x with integer bounds stays an integer tensor whose values are known to
    lie in [min, max] (so clamp(ids, 0, V - 1) may index an embedding of V rows); a float bound makes the
    result float."""
    x, lo, hi = c.t("x"), c.a("min"), c.a("max")
    if x.dtype == "bool":
        raise OpError(f"clamp: x {shape_str(x)} is bool; clamp takes numbers", "x")
    if lo is None and hi is None:
        raise OpError("clamp: give min, max or both")
    if lo is not None and hi is not None and lo > hi:
        raise OpError(f"clamp: min ({fmt(lo)}) is greater than max ({fmt(hi)})", "max")
    floats = any(isinstance(b, float) for b in (lo, hi))
    dtype = "f32" if floats and x.dtype not in FLOAT_DTYPES else x.dtype
    if dtype not in INT_DTYPES:
        return T(dtype, x.shape)
    start, stop = INT_RANGES[dtype]
    for name, v in (("min", lo), ("max", hi)):
        if v is not None and not start <= v < stop:
            raise OpError(f"clamp: {name} {v} does not fit x's dtype {dtype} (range({start}, {stop}))", name)
    a, b = (x.value_range[0], x.value_range[1] - 1) if x.value_range is not None else (-math.inf, math.inf)

    def limit(v):  # clamp is monotone: the ends of x's range go to the ends of the result's
        v = v if lo is None else max(v, lo)
        return v if hi is None else min(v, hi)

    a, b = limit(a), limit(b)
    return T(dtype, x.shape, (a, b + 1) if math.isfinite(a) and math.isfinite(b) else None)


# ---------------------------------------------------------------------------------------------
# layers with parameters
# ---------------------------------------------------------------------------------------------

def _linear_params(c: OpCall):
    x = c.t("x")
    fan_in = fixed_width(x.shape[-1], "linear", "input width (last dimension of x)")
    out = c.a("out")
    ps = [param("weight", (out, fan_in), uniform_fan_in(fan_in), op="linear", arg="out")]
    tie = c.a("tie")
    if tie is not None:
        owner, shape = tie
        if tuple(shape) != (out, fan_in):
            raise OpError(f"linear: cannot tie to {owner} of shape [{', '.join(map(str, shape))}]; "
                          f"this layer's weight has shape [{out}, {fan_in}]", "tie")
        ps[0] = dataclasses.replace(ps[0], tied_to=owner)
    if c.a("bias"):
        ps.append(param("bias", (out,), uniform_fan_in(fan_in), op="linear", arg="out"))
    return ps


def _linear_flops(c: OpCall, outs):
    x = c.t("x")
    return 2 * numel(outs[0]) * x.shape[-1] + (numel(outs[0]) if c.a("bias") else 0)


@op("linear", Arg("x", "tensor"), Arg("out", "int"), Arg("bias", "bool", True), Arg("tie", "owner", None),
    params=_linear_params, flops=_linear_flops, category="layer")
def _linear(c: OpCall):
    """linear(x, out, bias=true, tie=none): x @ W^T + b over the last dimension.

    tie=v shares the weight of the layer that computed v (e.g. an embedding: a tied output head).
    """
    x = c.t("x")
    need_float(x, "linear")
    need_rank(x, 1, "linear")
    if c.a("out") <= 0:
        raise OpError(f"linear: out must be positive, got {c.a('out')}", "out")
    fixed_width(x.shape[-1], "linear", "input width (last dimension of x)")
    return T(x.dtype, x.shape[:-1] + (c.a("out"),))


@op("embedding", Arg("ids", "tensor"), Arg("num", "int"), Arg("dim", "int"),
    params=lambda c: [param("weight", (c.a("num"), c.a("dim")), Init("normal", (1.0, 0.0)), op="embedding",
                            arg="num")],
    flops=lambda c, o: 0, category="layer")
def _embedding(c: OpCall):
    """embedding(ids, num, dim): a table of `num` rows of width `dim`, indexed by integer ids."""
    ids = c.t("ids")
    if ids.dtype not in INT_DTYPES:
        raise OpError(f"embedding: ids must be an integer tensor, got {shape_str(ids)}", "ids")
    num = c.a("num")
    if ids.value_range is not None and (ids.value_range[0] < 0 or ids.value_range[1] > num):
        lo, hi = ids.value_range
        raise OpError(f"embedding: ids take values in range({lo}, {hi}), outside the table of {num} rows", "ids")
    return T("f32", ids.shape + (c.a("dim"),))


@op("one_hot", Arg("ids", "tensor"), Arg("num", "int"), flops=lambda c, o: 0, category="layer")
def _one_hot(c: OpCall):
    """one_hot(ids, num): f32 one-hot vectors [..., num] of integer ids in range(num) (categorical values)."""
    ids = c.t("ids")
    if ids.dtype not in INT_DTYPES:
        raise OpError(f"one_hot: ids must be an integer tensor, got {shape_str(ids)}", "ids")
    num = c.a("num")
    if num <= 0:
        raise OpError(f"one_hot: num must be positive, got {num}", "num")
    if ids.value_range is not None and (ids.value_range[0] < 0 or ids.value_range[1] > num):
        lo, hi = ids.value_range
        raise OpError(f"one_hot: ids take values in range({lo}, {hi}), outside range({num})", "ids")
    return T("f32", ids.shape + (num,))


def _norm_axis(c: OpCall, name: str) -> int:
    """The normalised axis of a layer_norm / rms_norm call, checked: a float tensor of rank >= 1 and a
    `dim` in range for it (a located error at `dim` otherwise)."""
    x = c.t("x")
    need_float(x, name)
    need_rank(x, 1, name)
    if not c.a("eps") >= 0:  # (0 is torch's too: a row of zeros then gives nan, as there)
        raise OpError(f"{name}: eps must be 0 or more, got {c.a('eps')}", "eps")
    return norm_axis(c.a("dim"), x.rank, name)


def _norm_params(name: str, with_bias: bool):
    def params(c: OpCall):
        if not c.a("affine"):
            return []
        x = c.t("x")
        axis = _norm_axis(c, name)
        if axis == x.rank - 1:
            d = fixed_width(x.shape[-1], name, "normalised width (last dimension of x)")
        else:
            d = fixed_width(x.shape[axis], name, f"normalised width (dimension {axis} of x)", "dim")
        ps = [param("weight", (d,), Init("ones"), op=name)]
        if with_bias and c.a("bias"):
            ps.append(param("bias", (d,), Init("zeros"), op=name))
        return ps

    return params


@op("layer_norm", Arg("x", "tensor"), Arg("eps", "float", 1e-5), Arg("affine", "bool", True),
    Arg("bias", "bool", True), Arg("dim", "axis", -1), params=_norm_params("layer_norm", True),
    flops=lambda c, o: 5 * numel(o[0]), category="layer")
def _layer_norm(c: OpCall):
    """layer_norm(x, eps=1e-5, affine=true, bias=true, dim=-1): normalise over one dimension (default the last).

    (x - mean) / sqrt(var + eps) * weight + bias, the mean and the biased variance taken over dimension
    `dim` of x for each position of the others; weight and bias have the size of that dimension.
    dim names a single dimension (negative counts from the end): dim=1 on [B, C, H, W] is ConvNeXt's
    channels-first LayerNorm, each pixel normalised over its C channels.
    """
    _norm_axis(c, "layer_norm")
    return c.t("x")


@op("rms_norm", Arg("x", "tensor"), Arg("eps", "float", 1e-6), Arg("affine", "bool", True),
    Arg("dim", "axis", -1), params=_norm_params("rms_norm", False), flops=lambda c, o: 4 * numel(o[0]),
    category="layer")
def _rms_norm(c: OpCall):
    """rms_norm(x, eps=1e-6, affine=true, dim=-1): x / sqrt(mean(x^2) + eps) * weight over one dimension.

    The mean is taken over dimension `dim` of x (default the last; a single dimension, negative counts
    from the end), and weight has the size of that dimension.
    """
    _norm_axis(c, "rms_norm")
    return c.t("x")


@op("dropout", Arg("x", "tensor"), Arg("p", "float", 0.1), flops=lambda c, o: 0, category="layer")
def _dropout(c: OpCall):
    """dropout(x, p=0.1): zero elements with probability p while training; identity at inference."""
    if not 0.0 <= c.a("p") < 1.0:
        raise OpError(f"dropout: p must be in [0, 1), got {c.a('p')}", "p")
    need_float(c.t("x"), "dropout")
    return c.t("x")


def attention_inner(c: OpCall) -> int:
    """The width of attention's projected queries, keys and values: heads * head_dim (head_dim=, when
    given), else the model width d (d / heads per head)."""
    head_dim = c.attrs.get("head_dim")
    if head_dim is None:
        return fixed_width(c.t("x").shape[-1], "attention", "model width (last dimension of x)")
    return c.a("heads") * head_dim


def attention_kv_heads(c: OpCall) -> int:
    """How many key/value heads attention has: kv_heads= (grouped-query attention), else heads."""
    kv_heads = c.attrs.get("kv_heads")
    return c.a("heads") if kv_heads is None else kv_heads


def attention_kv_inner(c: OpCall) -> int:
    """The width of attention's projected keys and values: kv_heads * head_dim (attention_inner without
    kv_heads=)."""
    kv_heads = c.attrs.get("kv_heads")
    inner = attention_inner(c)
    return inner if kv_heads is None or kv_heads == c.a("heads") else inner // c.a("heads") * kv_heads


def _attention_params(c: OpCall):
    x, kv = c.t("x"), c.t("kv")
    d = fixed_width(x.shape[-1], "attention", "model width (last dimension of x)")
    dkv = d if kv is None else fixed_width(kv.shape[-1], "attention", "width of kv", "kv")
    inner, kv_inner = attention_inner(c), attention_kv_inner(c)
    ps = []
    if c.a("qkv"):
        fused = 3 * inner if kv_inner == inner else inner + 2 * kv_inner
        ps.append(param("qkv.weight", (fused, d), uniform_fan_in(d), op="attention"))
        if c.a("bias"):
            ps.append(param("qkv.bias", (fused,), uniform_fan_in(d), op="attention"))
        projections = (("o", d, inner),)
    else:
        projections = (("q", inner, d), ("k", kv_inner, dkv), ("v", kv_inner, dkv), ("o", d, inner))
    for proj, out, fan_in in projections:
        ps.append(param(f"{proj}.weight", (out, fan_in), uniform_fan_in(fan_in), op="attention"))
        if c.a("bias"):
            ps.append(param(f"{proj}.bias", (out,), uniform_fan_in(fan_in), op="attention"))
    return ps


def _attention_flops(c: OpCall, outs):
    x, kv = c.t("x"), c.t("kv")
    kv = kv or x
    b_t = product(x.shape[:-1])
    b_s = product(kv.shape[:-1])
    d, inner = x.shape[-1], attention_inner(c)
    kv_inner = attention_kv_inner(c)  # kv_heads * head_dim: grouped-query attention's smaller k and v
    proj = 2 * b_t * d * inner * 2 + 2 * b_s * kv.shape[-1] * kv_inner * 2  # q and o; k and v
    q = T(x.dtype, x.shape[:-1] + (inner,))
    rope = 0
    if c.attrs.get("rope") is not None:  # x*cos + rotate_half(x)*sin per rotated channel of q and k; the angle
        if kv_inner == inner:  # tables (shared by the batch) not counted
            rope = 3 * 2 * b_t * c.a("heads") * attention_rope_dim(c)
        else:  # k has kv_heads heads to turn (rotated before its heads are repeated)
            rope = 3 * b_t * (c.a("heads") + attention_kv_heads(c)) * attention_rope_dim(c)
    return proj + rope + attention_core_flops(q, kv.shape[-2], c.a("heads"), c.t("mask"), c.t("prefix"))


def attention_rope_dim(c: OpCall) -> int:
    """How many channels of each head rotary embedding turns: rope_dim=, else the whole head."""
    rope_dim = c.attrs.get("rope_dim")
    return rope_dim if rope_dim is not None else attention_inner(c) // c.a("heads")


def attention_core_flops(q: TensorType, s: Dim, heads: int, mask: TensorType | None,
                         prefix: TensorType | None) -> Dim:
    """softmax(q k^T) v over S keys (and the prefix's l rows): QK^T and AV, softmax, masking."""
    batch, t, d = product(q.shape[:-2]), q.shape[-2], q.shape[-1]
    s = s + (prefix.shape[-2] if prefix is not None else 0)
    masking = batch * heads * t * s if mask is not None else 0  # one select or add per score
    return 2 * batch * t * s * d * 2 + 5 * batch * heads * t * s + masking


@op("attention", Arg("x", "tensor"), Arg("heads", "int"), Arg("causal", "bool", False),
    Arg("kv", "tensor?", None), Arg("bias", "bool", True), Arg("dropout", "float", 0.0),
    Arg("qkv", "bool", False), Arg("impl", "str", "math", ("math", "sdpa")), Arg("mask", "tensor?", None),
    Arg("prefix", "tensor?", None), Arg("head_dim", "int", None), Arg("rope", "float", None),
    Arg("rope_dim", "int", None), Arg("kv_heads", "int", None, shown=False), params=_attention_params,
    flops=_attention_flops, category="layer")
def _attention(c: OpCall):
    """attention(x, heads, causal=false, kv=none, bias=true, dropout=0.0, mask=none, prefix=none,
    head_dim=none, rope=none, rope_dim=none, kv_heads=none): multi-head softmax attention.

    Queries come from x [..., T, d]; keys and values from kv [..., S, dkv] (default x; its batch
    dimensions may be fewer or 1 and broadcast to x's, e.g. [S, dkv] shared by every batch row). With
    causal, position t attends only to positions <= t. qkv=true keeps one fused q/k/v projection
    (self-attention only); impl='sdpa' computes it with a fused attention kernel. Passes set both.

    mask: a bool or float tensor broadcastable to [..., T, S] (the same for every head) or, one rank
    higher, to [..., heads, T, S]. A bool mask says where a query MAY attend (true = attend, the
    convention of scaled_dot_product_attention); a float mask is added to the scores (0 or -inf, or
    any bias). Combined with causal, both apply. A query with no allowed position gets zeros (as
    scaled_dot_product_attention gives; a padded sequence gives no NaN, in outputs or gradients).

    prefix: l key rows and l value rows put before the projected keys and values (prefix tuning,
    prompts), [..., 2, l, d]: [..., 0, :, :] the keys, [..., 1, :, :] the values, per batch row or shared
    (batch dimensions broadcast to x's). Every query sees every prefix row; causal and mask apply to
    the S positions of kv only.

    head_dim: the width of each head's queries, keys and values (default d / heads). The projections
    then map to heads * head_dim columns and the output projection back to d, so a head count need not
    divide d: structured pruning (`specc prune`) removes heads this way. A prefix then has rows of
    width heads * head_dim.

    rope: rotary position embeddings (RoPE) of this base (e.g. 10000) on each head's queries and keys
    after their projections, at positions 0..T-1 (self-attention only), in the "rotate half" layout of
    the rotary op (GPT-NeoX: channel i of a head pairs with channel i + rope_dim/2; not GPT-J's
    interleaved pairs). rope_dim: how many leading channels of each head turn (even, at most head_dim;
    default all, GPT-NeoX's rotary_pct / CodeGen2's rotary_dim); the frequencies are
    base ** (-2i / rope_dim). Prefix rows are not rotated (they have no position; the queries that
    read them are).

    kv_heads: grouped-query attention (GQA: Llama 2/3, Mistral; Ainslie et al., 2023): k and v project to
    kv_heads * head_dim columns (weights [kv_heads * head_dim, dkv]; default kv_heads = heads, plain
    multi-head attention), and each group of heads / kv_heads consecutive query heads reads one key/value
    head (query head i reads key/value head i // (heads / kv_heads), torch's repeat_interleave of the k/v
    heads); kv_heads=1 is multi-query attention. It must divide heads. It composes with every other
    option: kv= (cross-attention), causal, mask (a per-head mask has heads slices, one per query head),
    rope (k rotated on its kv_heads heads), head_dim=, dropout, qkv=true (one fused projection of
    (heads + 2 * kv_heads) * head_dim rows: q, then k, then v), and prefix= (and training prefixes),
    whose key and value rows then have the width kv_heads * head_dim. FLOPs: the k and v projections
    count kv_heads * head_dim outputs (rope: k's kv_heads heads); the scores and the weighted sum are
    those of heads query heads, as without it (sharing a key/value head saves no multiply there).
    `specc prune` leaves a GQA layer's heads whole (mlp neurons and the heads of other layers still prune).
    """
    x, kv = c.t("x"), c.t("kv")
    need_float(x, "attention")
    need_rank(x, 2, "attention")
    heads = c.a("heads")
    d = fixed_width(x.shape[-1], "attention", "model width (last dimension of x)")
    head_dim = c.attrs.get("head_dim")
    if head_dim is not None:
        if heads <= 0:
            raise OpError(f"attention: heads must be positive, got {heads}", "heads")
        if head_dim <= 0:
            raise OpError(f"attention: head_dim must be positive, got {head_dim}", "head_dim")
    elif heads <= 0 or d % heads:
        raise OpError(f"attention: the width {d} is not divisible by heads={heads}", "heads")
    kv_heads = c.attrs.get("kv_heads")
    if kv_heads is not None and (kv_heads <= 0 or heads % kv_heads):
        raise OpError(f"attention: kv_heads={kv_heads} must be positive and divide heads={heads} (each group of "
                      f"heads / kv_heads query heads shares one key/value head)", "kv_heads")
    if kv is not None:
        need_float(kv, "attention", "kv")
        if kv.dtype != x.dtype:  # one set of projections, of x's dtype, for queries, keys and values
            raise OpError(f"attention: kv must have x's dtype {x.dtype}, got {shape_str(kv)}", "kv")
        need_rank(kv, 2, "attention", "kv")
        check_batch_broadcast(kv, x, "attention", "kv")
        if c.a("causal") and kv.shape[-2] != x.shape[-2]:
            raise OpError("attention: causal attention needs kv of the same length as x", "causal")
    if not 0.0 <= c.a("dropout") < 1.0:
        raise OpError(f"attention: dropout must be in [0, 1), got {c.a('dropout')}", "dropout")
    if c.a("qkv") and kv is not None:
        raise OpError("attention: a fused q/k/v projection needs self-attention (no kv)", "qkv")
    if c.t("mask") is not None:
        _check_attention_mask(c.t("mask"), x, (kv or x).shape[-2], heads)
    if c.t("prefix") is not None:
        check_attention_prefix(c.t("prefix"), x, "attention", width=attention_kv_inner(c),
                               width_name="heads * head_dim" if kv_heads is None else "kv_heads * head_dim")
    _check_rope(c, kv)
    return x


def _check_rope(c: OpCall, kv: TensorType | None) -> None:
    rope, rope_dim = c.attrs.get("rope"), c.attrs.get("rope_dim")
    if rope is None:
        if rope_dim is not None:
            raise OpError("attention: rope_dim needs rotary embeddings, e.g. rope=10000", "rope_dim")
        return
    if not rope > 0:
        raise OpError(f"attention: rope (the rotary base) must be positive, got {rope}", "rope")
    if kv is not None:
        raise OpError("attention: rope needs self-attention (no kv): positions of two sequences do not compare",
                      "rope")
    head_dim = attention_inner(c) // c.a("heads")
    r = attention_rope_dim(c)
    if not 0 < r <= head_dim or r % 2:
        what = "rope_dim" if rope_dim is not None else "the head width (rotated whole by default)"
        raise OpError(f"attention: {what} must be even and in [2, head_dim={head_dim}], got {r}",
                      "rope_dim" if rope_dim is not None else "rope")


def check_batch_broadcast(t: TensorType, x: TensorType, op_name: str, arg: str, what: str = "x") -> None:
    """The batch dimensions of t (all but the last two) broadcast to those of x without growing them."""
    tb, xb = t.shape[:-2], x.shape[:-2]
    bad = len(tb) > len(xb) or any(a != 1 and a != b for a, b in zip(reversed(tb), reversed(xb)))
    if bad:
        raise OpError(f"{op_name}: the batch dimensions {dims_str(tb)} of {arg} {shape_str(t)} do not broadcast to "
                      f"those of {what} {shape_str(x)}, {dims_str(xb)}", arg)


def check_attention_prefix(prefix: TensorType, x: TensorType, op_name: str, x_name: str = "x",
                           width: Dim | None = None, width_name: str = "heads * head_dim") -> None:
    """A prefix of key and value rows [..., 2, l, w] for queries x [..., T, d]: w = d, or `width` (the
    heads * head_dim of an attention with head_dim=, kv_heads * head_dim with kv_heads=: `width_name`)."""
    if prefix.dtype != x.dtype:
        raise OpError(f"{op_name}: the prefix must have {x_name}'s dtype {x.dtype}, got {shape_str(prefix)}", "prefix")
    own = width is None or width == x.shape[-1]
    width = x.shape[-1] if width is None else width
    if prefix.rank < 3 or prefix.shape[-3] != 2 or prefix.shape[-1] != width:
        what = f"of {x_name}'s width" if own else f"of width {width_name}"
        raise OpError(f"{op_name}: the prefix must be [..., 2, l, {fmt(width)}] (l key rows, then l value "
                      f"rows, {what}), got {shape_str(prefix)}", "prefix")
    fixed_width(prefix.shape[-2], op_name, "prefix length l (dimension -2 of the prefix)", "prefix")
    pb, xb = prefix.shape[:-3], x.shape[:-2]
    if len(pb) > len(xb) or any(a != 1 and a != b for a, b in zip(reversed(pb), reversed(xb))):
        raise OpError(f"{op_name}: the batch dimensions {dims_str(pb)} of the prefix {shape_str(prefix)} do not "
                      f"broadcast to those of {x_name} {shape_str(x)}, {dims_str(xb)}", "prefix")


def _check_attention_mask(mask: TensorType, x: TensorType, s: Dim, heads: int, op_name: str = "attention",
                          x_name: str = "x") -> None:
    """The mask must broadcast to the scores [*batch, T, S] (or [*batch, heads, T, S]) without growing them."""
    if mask.dtype != "bool" and mask.dtype != x.dtype:
        kind = "an integer" if mask.dtype in INT_DTYPES else f"a {mask.dtype}"
        raise OpError(f"{op_name}: the mask must be bool (true = may attend) or a float mask of {x_name}'s dtype "
                      f"{x.dtype} to add to the scores, got {kind} mask {shape_str(mask)}", "mask")
    batch, t = x.shape[:-2], x.shape[-2]
    if mask.rank <= x.rank:
        scores, layout = batch + (t, s), "[" + ", ".join(["..."] * bool(batch) + ["T", "S"]) + "]"
    elif mask.rank == x.rank + 1:
        scores, layout = batch + (heads, t, s), "[" + ", ".join(["..."] * bool(batch) + ["heads", "T", "S"]) + "]"
    else:
        raise OpError(f"{op_name}: the mask {shape_str(mask)} has rank {mask.rank}, but the scores of {x_name} "
                      f"{shape_str(x)} have at most rank {x.rank + 1} ([..., heads, T, S])", "mask")
    for i in range(1, mask.rank + 1):
        m, want = mask.shape[-i], scores[-i]
        if m != 1 and m != want:
            raise OpError(f"{op_name}: the mask {shape_str(mask)} does not broadcast to the scores "
                          f"{dims_str(scores)} ({layout}) of {x_name} {shape_str(x)}: dimension {mask.rank - i} of the "
                          f"mask is {fmt(m)}, where the scores have {fmt(want)}", "mask")


def _mlp_params(c: OpCall):
    x = c.t("x")
    d = fixed_width(x.shape[-1], "mlp", "input width (last dimension of x)")
    hidden, out = c.a("hidden"), c.a("out") or d
    ps = [param("fc1.weight", (hidden, d), uniform_fan_in(d), op="mlp", arg="hidden")]
    if c.a("bias"):
        ps.append(param("fc1.bias", (hidden,), uniform_fan_in(d), op="mlp", arg="hidden"))
    ps.append(param("fc2.weight", (out, hidden), uniform_fan_in(hidden), op="mlp", arg="hidden"))
    if c.a("bias"):
        ps.append(param("fc2.bias", (out,), uniform_fan_in(hidden), op="mlp", arg="hidden"))
    return ps


def _mlp_flops(c: OpCall, outs):
    x = c.t("x")
    rows = product(x.shape[:-1])
    hidden, out = c.a("hidden"), outs[0].shape[-1]
    return 2 * rows * x.shape[-1] * hidden + 2 * rows * hidden * out + 9 * rows * hidden


@op("mlp", Arg("x", "tensor"), Arg("hidden", "int"), Arg("out", "int", None), Arg("act", "op", "gelu", ACTIVATIONS),
    Arg("bias", "bool", True), Arg("dropout", "float", 0.0), params=_mlp_params, flops=_mlp_flops, category="layer")
def _mlp(c: OpCall):
    """mlp(x, hidden, out=width of x, act=gelu, bias=true, dropout=0.0): linear -> act -> linear. act: relu,
    gelu, silu, tanh, sigmoid, softplus, leaky_relu, elu, hardswish, mish or identity, each as the op of
    that name computes it with its default arguments (leaky_relu's slope 0.01, elu's alpha 1, softplus's
    beta 1 and threshold 20, gelu's exact form)."""
    x = c.t("x")
    need_float(x, "mlp")
    need_rank(x, 1, "mlp")
    d = fixed_width(x.shape[-1], "mlp", "input width (last dimension of x)")
    if c.a("hidden") <= 0:
        raise OpError(f"mlp: hidden must be positive, got {c.a('hidden')}", "hidden")
    return T(x.dtype, x.shape[:-1] + (c.a("out") or d,))


def _recurrent_params(name: str, gates: int):
    """The parameters of lstm (gates=4: i, f, g, o) and gru (gates=3: r, z, n), named and shaped as
    torch.nn.LSTM's and torch.nn.GRU's (so a torch state_dict loads by name), each uniform(+-1/sqrt(hidden))
    as torch initialises them."""
    def params(c: OpCall):
        x = c.t("x")
        d = fixed_width(x.shape[-1], name, "input width (last dimension of x)")
        h, layers = c.a("hidden"), c.a("layers")
        dirs = 2 if c.a("bidirectional") else 1
        init = Init("uniform", (1.0 / h ** 0.5,))
        ps = []
        for layer in range(layers):
            fan_in = d if layer == 0 else h * dirs
            for suffix in ("", "_reverse")[:dirs]:
                ps.append(param(f"weight_ih_l{layer}{suffix}", (gates * h, fan_in), init, op=name, arg="hidden"))
                ps.append(param(f"weight_hh_l{layer}{suffix}", (gates * h, h), init, op=name, arg="hidden"))
                ps.append(param(f"bias_ih_l{layer}{suffix}", (gates * h,), init, op=name, arg="hidden"))
                ps.append(param(f"bias_hh_l{layer}{suffix}", (gates * h,), init, op=name, arg="hidden"))
        return ps
    return params


def _recurrent_flops(gates: int, per_state: int):
    """Per layer, direction and step (B * T steps): the two projections, 2 * gates * H * (d_in + H), 4 per
    gate element (the two biases, the sum of the projections, the activation) and `per_state` per entry
    of the state (the cell's own update)."""
    def flops(c: OpCall, outs):
        x = c.t("x")
        h, dirs = c.a("hidden"), 2 if c.a("bidirectional") else 1
        steps = product(x.shape[:-1])
        total: Dim = 0
        for layer in range(c.a("layers")):
            fan_in = x.shape[-1] if layer == 0 else h * dirs
            total = total + dirs * steps * (2 * gates * h * (fan_in + h) + 4 * gates * h + per_state * h)
        return total
    return flops


def _recurrent(name: str, c: OpCall):
    x = c.t("x")
    need_float(x, name)
    need_rank(x, 3, name, hi=3)
    fixed_width(x.shape[-1], name, "input width (last dimension of x)")
    if c.a("hidden") <= 0 or c.a("layers") <= 0:
        raise OpError(f"{name}: hidden and layers must be positive", "hidden")
    if c.a("layers") > MAX_LAYERS:
        raise OpError(f"{name}: at most {MAX_LAYERS} layers, got {c.a('layers')}", "layers")
    dirs = 2 if c.a("bidirectional") else 1
    return T(x.dtype, x.shape[:-1] + (c.a("hidden") * dirs,))


@op("lstm", Arg("x", "tensor"), Arg("hidden", "int"), Arg("layers", "int", 1), Arg("bidirectional", "bool", False),
    params=_recurrent_params("lstm", 4), flops=_recurrent_flops(4, 6), category="layer")
def _lstm(c: OpCall):
    """lstm(x, hidden, layers=1, bidirectional=false): x [B, T, d] -> [B, T, hidden * directions].

    torch.nn.LSTM(batch_first=True) with h0 = c0 = 0, its parameters by name (weight_ih_l{k} [4H, d_in],
    weight_hh_l{k} [4H, H], bias_ih_l{k}, bias_hh_l{k} [4H], gates i, f, g, o; ..._reverse backward).
    FLOPs: the sum over layers and directions of B * T * (8 H (d_in + H) + 22 H): the two projections;
    4 per gate element (the two biases, the sum of the two projections, the activation); 6 per state
    entry (the cell and hidden updates)."""
    return _recurrent("lstm", c)


@op("gru", Arg("x", "tensor"), Arg("hidden", "int"), Arg("layers", "int", 1), Arg("bidirectional", "bool", False),
    params=_recurrent_params("gru", 3), flops=_recurrent_flops(3, 4), category="layer")
def _gru(c: OpCall):
    """gru(x, hidden, layers=1, bidirectional=false): x [B, T, d] -> [B, T, hidden * directions], as torch.nn.GRU.

    torch.nn.GRU(batch_first=True) with h0 = 0, per step: r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz), n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),
    h' = (1 - z) * n + z * h. Parameters as torch's, so that its state_dict loads by name: weight_ih_l{k}
    [3H, d_in], weight_hh_l{k} [3H, H], bias_ih_l{k} and bias_hh_l{k} [3H] (gates r, z, n), U(-1/sqrt(H),
    1/sqrt(H)); ..._reverse for the backward direction, whose output follows the forward one's (concat on
    the last dim); layer k > 0 reads the previous layer's output. FLOPs: the sum over layers and
    directions of B * T * (6 H (d_in + H) + 16 H): the two projections; 4 per gate element (the two
    biases, the sum of the two projections, the activation); 4 per state entry (n's reset product
    r * (W_hn h + b_hn), and h' computed as n + z * (h - n))."""
    return _recurrent("gru", c)


# ---------------------------------------------------------------------------------------------
# reductions, softmax, matmul
# ---------------------------------------------------------------------------------------------

@op("softmax", Arg("x", "tensor"), Arg("dim", "axis", -1), flops=lambda c, o: 5 * numel(o[0]),
    category="activation")
def _softmax(c: OpCall):
    """softmax(x, dim=-1)."""
    x = c.t("x")
    need_float(x, "softmax")
    norm_axis(c.a("dim"), x.rank, "softmax", scalar_ok=True)
    return x


def _reduce(name: str, doc: str):
    def infer(c: OpCall):
        x = c.t("x")
        dims = c.a("dim")
        if name == "mean":
            need_float(x, name)
        if dims is None:
            axes = set(range(x.rank))
        else:
            dims = dims if isinstance(dims, (list, tuple)) else [dims]
            if not dims:
                raise OpError(f"{name}: dim=[] names no dimension; leave dim out to reduce over all of them", "dim")
            axes = {norm_axis(d, x.rank, name, scalar_ok=True) for d in dims}
            if len(axes) != len(dims):
                raise OpError(f"{name}: repeated dimension in {list(dims)}", "dim")
        keep = c.a("keepdim")
        shape = tuple((1 if keep else None) if i in axes else d for i, d in enumerate(x.shape))
        dtype = "i64" if x.dtype in INT_DTYPES or x.dtype == "bool" else x.dtype  # integer sums widen
        return T(dtype, tuple(d for d in shape if d is not None))

    infer.__doc__ = doc
    op(name, Arg("x", "tensor"), Arg("dim", "axes", None), Arg("keepdim", "bool", False),
       flops=lambda c, o: numel(c.t("x")), category="reduction")(infer)


_reduce("mean", "mean(x, dim=none, keepdim=false): mean over one dimension, a list of them, or all.")
_reduce("sum", "sum(x, dim=none, keepdim=false): sum over one dimension, a list of them, or all.")


@op("cumsum", Arg("x", "tensor"), Arg("dim", "axis", -1), Arg("reverse", "bool", False), flops=elementwise_flops,
    category="reduction")
def _cumsum(c: OpCall):
    """cumsum(x, dim=-1, reverse=false): running sums along `dim`, as torch.cumsum (y[..., i] = x[..., 0] +
    ... + x[..., i]); reverse=true sums from the end (y[..., i] = x[..., i] + ... + x[..., n - 1]). Integer
    and bool tensors sum to i64, as in torch."""
    x = c.t("x")
    if x.rank == 0:
        raise OpError(f"cumsum: x {shape_str(x)} has no dimension to sum along", "x")
    norm_axis(c.a("dim"), x.rank, "cumsum")
    return T("i64" if x.dtype in INT_DTYPES or x.dtype == "bool" else x.dtype, x.shape)


@op("matmul", Arg("x", "tensor"), Arg("y", "tensor"),
    flops=lambda c, o: 2 * numel(o[0]) * c.t("x").shape[-1], category="elementwise")
def _matmul(c: OpCall):
    """matmul(x, y) or x @ y: [..., M, K] @ [..., K, N] -> [..., M, N], batch dimensions broadcast."""
    x, y = c.t("x"), c.t("y")
    need_rank(x, 2, "matmul")
    need_rank(y, 2, "matmul", "y")
    if x.dtype != y.dtype:
        raise OpError(f"matmul: dtypes differ: {shape_str(x)} @ {shape_str(y)}", "y")
    if x.shape[-1] != y.shape[-2]:
        raise OpError(f"matmul: inner dimensions differ: {shape_str(x)} @ {shape_str(y)} "
                      f"(dimension -1 of x is {fmt(x.shape[-1])}, dimension -2 of y is {fmt(y.shape[-2])})", "y")
    batch = broadcast(T(x.dtype, x.shape[:-2]), T(y.dtype, y.shape[:-2]), "matmul")
    return T(x.dtype, batch + (x.shape[-2], y.shape[-1]))


# ---------------------------------------------------------------------------------------------
# shape manipulation
# ---------------------------------------------------------------------------------------------

@op("transpose", Arg("x", "tensor"), Arg("dim0", "axis"), Arg("dim1", "axis"), flops=lambda c, o: 0,
    category="shape")
def _transpose(c: OpCall):
    """transpose(x, dim0, dim1): swap two dimensions."""
    x = c.t("x")
    a = norm_axis(c.a("dim0"), x.rank, "transpose", "dim0")
    b = norm_axis(c.a("dim1"), x.rank, "transpose", "dim1")
    shape = list(x.shape)
    shape[a], shape[b] = shape[b], shape[a]
    return T(x.dtype, tuple(shape), x.value_range)


@op("permute", Arg("x", "tensor"), Arg("dims", "axes", variadic=True), flops=lambda c, o: 0, category="shape")
def _permute(c: OpCall):
    """permute(x, d0, d1, ...): reorder all dimensions."""
    x = c.t("x")
    need_rank(x, 1, "permute")
    dims = [norm_axis(d, x.rank, "permute", "dims") for d in c.a("dims")]
    if sorted(dims) != list(range(x.rank)):
        raise OpError(f"permute: {list(c.a('dims'))} is not a permutation of the {x.rank} dimensions of "
                      f"{shape_str(x)}", "dims")
    return T(x.dtype, tuple(x.shape[d] for d in dims), x.value_range)


@op("reshape", Arg("x", "tensor"), Arg("shape", "dims", variadic=True), flops=lambda c, o: 0, category="shape")
def _reshape(c: OpCall):
    """reshape(x, d0, d1, ...): a new shape with the same number of elements; one entry may be -1."""
    x = c.t("x")
    shape = list(c.a("shape"))
    holes = [i for i, d in enumerate(shape) if d == -1]
    if len(holes) > 1:
        raise OpError("reshape: at most one dimension may be -1", "shape")
    for d in shape:
        if isinstance(d, int) and d < -1 or d == 0:
            raise OpError(f"reshape: invalid size {d}", "shape")
    total = x.numel()
    if holes:
        known = product(d for d in shape if d != -1)
        rest = div_exact(total, known)
        if rest is None:
            raise OpError(f"reshape: cannot reshape {shape_str(x)} ({fmt(total)} elements) into "
                          f"[{', '.join(fmt(d) for d in shape)}]: {fmt(total)} is not divisible by {fmt(known)}",
                          "shape")
        shape[holes[0]] = rest
    elif product(shape) != total:
        raise OpError(f"reshape: cannot reshape {shape_str(x)} ({fmt(total)} elements) into "
                      f"[{', '.join(fmt(d) for d in shape)}] ({fmt(product(shape))} elements)", "shape")
    return T(x.dtype, tuple(shape), x.value_range)


@op("expand", Arg("x", "tensor"), Arg("shape", "dims", variadic=True), flops=lambda c, o: 0, category="shape")
def _expand(c: OpCall):
    """expand(x, d0, d1, ...): x repeated along its size-1 dimensions to the given sizes (a view, as torch's
    expand; -1 keeps a dimension's size). With more sizes than x has dimensions, x gets new leading ones:
    expand(cls, B, 1, d) puts a learned [1, 1, d] class token before every batch row's tokens."""
    x = c.t("x")
    shape = list(c.a("shape"))
    if len(shape) < x.rank:
        raise OpError(f"expand: {len(shape)} sizes for {shape_str(x)}, which has {x.rank} dimensions; give one "
                      f"size per dimension (-1 keeps it), and more for new leading ones", "shape")
    lead = len(shape) - x.rank
    out = []
    for i, d in enumerate(shape):
        have = x.shape[i - lead] if i >= lead else None
        if isinstance(d, int) and d == -1:
            if have is None:
                raise OpError(f"expand: size {i} is -1, but it is a new leading dimension, which has no size to "
                              f"keep", "shape")
            out.append(have)
            continue
        if isinstance(d, int) and d < 0:
            raise OpError(f"expand: invalid size {d}", "shape")
        if have is not None and have != 1 and have != d:
            raise OpError(f"expand: dimension {i - lead} of {shape_str(x)} is {fmt(have)}, which can only stay "
                          f"{fmt(have)}, not become {fmt(d)} (only size-1 dimensions repeat)", "shape")
        out.append(d)
    return T(x.dtype, tuple(out), x.value_range)


@op("concat", Arg("xs", "tensors"), Arg("dim", "axis", -1), flops=lambda c, o: 0, category="shape")
def _concat(c: OpCall):
    """concat([a, b, ...], dim=-1): join tensors along one dimension."""
    xs = c.t("xs")
    if not xs:
        raise OpError("concat: needs at least one tensor", "xs")
    first = xs[0]
    axis = norm_axis(c.a("dim"), first.rank, "concat")
    total: Dim = 0
    for i, t in enumerate(xs):
        if t.rank != first.rank:
            raise OpError(f"concat: tensor {i} is {shape_str(t)}, but tensor 0 is {shape_str(first)} "
                          f"(rank {t.rank} vs {first.rank})", f"xs[{i}]")
        if t.dtype != first.dtype:
            raise OpError(f"concat: tensor {i} has dtype {t.dtype}, tensor 0 has {first.dtype}", f"xs[{i}]")
        for j, (a, b) in enumerate(zip(first.shape, t.shape)):
            if j != axis and a != b:
                raise OpError(f"concat: tensor {i} is {shape_str(t)}, tensor 0 is {shape_str(first)}: "
                              f"dimension {j} is {fmt(b)} vs {fmt(a)}", f"xs[{i}]")
        total = total + t.shape[axis]
    shape = list(first.shape)
    shape[axis] = total
    return T(first.dtype, tuple(shape))


@op("stack", Arg("xs", "tensors"), Arg("dim", "axis", 0), flops=lambda c, o: 0, category="shape")
def _stack(c: OpCall):
    """stack([a, b, ...], dim=0): tensors of one shape and dtype joined along a new dimension `dim` (of the
    result: dim=-1 puts it last), as torch.stack."""
    xs = c.t("xs")
    if not xs:
        raise OpError("stack: needs at least one tensor", "xs")
    first = xs[0]
    axis = norm_axis(c.a("dim"), first.rank + 1, "stack")
    for i, t in enumerate(xs[1:], 1):
        if (t.dtype, t.shape) != (first.dtype, first.shape):
            raise OpError(f"stack: tensor {i} is {shape_str(t)}, but tensor 0 is {shape_str(first)}: stacked "
                          f"tensors have one shape and dtype", f"xs[{i}]")
    shape = list(first.shape)
    shape.insert(axis, len(xs))
    return T(first.dtype, tuple(shape), first.value_range if all(t.value_range == first.value_range for t in xs)
             else None)


@op("flip", Arg("x", "tensor"), Arg("dims", "axes"), flops=lambda c, o: 0, category="shape")
def _flip(c: OpCall):
    """flip(x, dims): x with the order of its entries reversed along each dimension of `dims` (an int or a
    list), as torch.flip: flip(x, 1)[:, i] = x[:, n - 1 - i]."""
    x = c.t("x")
    dims = c.a("dims")
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if not dims:
        raise OpError("flip: dims=[] names no dimension", "dims")
    axes = [norm_axis(d, x.rank, "flip", "dims", scalar_ok=True) for d in dims]
    if len(set(axes)) != len(axes):
        raise OpError(f"flip: repeated dimension in {dims}", "dims")
    return x


@op("split", Arg("x", "tensor"), Arg("sections", "any"), Arg("dim", "axis", -1), flops=lambda c, o: 0,
    category="shape")
def _split(c: OpCall):
    """split(x, n or [s0, s1, ...], dim=-1): n equal parts, or parts of the given sizes. Returns several values."""
    x = c.t("x")
    axis = norm_axis(c.a("dim"), x.rank, "split")
    size = x.shape[axis]
    sections = c.a("sections")
    if isinstance(sections, int) and not isinstance(sections, bool):
        if sections <= 0:
            raise OpError(f"split: the number of parts must be positive, got {sections}", "sections")
        if sections > MAX_PARTS:
            raise OpError(f"split: at most {MAX_PARTS} parts, got {sections}", "sections")
        part = div_exact(size, sections)
        if part is None:
            raise OpError(f"split: dimension {axis} of {shape_str(x)} ({fmt(size)}) is not divisible into "
                          f"{sections} equal parts", "sections")
        sizes = [part] * sections
    elif isinstance(sections, (list, tuple)) and sections:
        sizes = list(sections)
        if sum_dims(sizes) != size:
            raise OpError(f"split: sizes {[fmt(s) for s in sizes]} add up to {fmt(sum_dims(sizes))}, but dimension "
                          f"{axis} of {shape_str(x)} is {fmt(size)}", "sections")
    else:
        raise OpError("split: sections must be a number of parts or a list of sizes", "sections")
    outs = []
    for s in sizes:
        shape = list(x.shape)
        shape[axis] = s
        outs.append(T(x.dtype, tuple(shape), x.value_range))
    return tuple(outs)


def _index_item(item) -> bool:
    """An index as the elaborator records it: ('int', i), ('slice', start, stop) for a step of 1, or
    ('slice', start, stop, step) for a positive integer step other than 1."""
    if not isinstance(item, tuple) or not item:
        return False
    if item[0] == "int":
        return len(item) == 2 and isinstance(item[1], int) and not isinstance(item[1], bool)
    if item[0] != "slice" or len(item) not in (3, 4) or not all(b is None or is_dim(b) for b in item[1:3]):
        return False
    return len(item) == 3 or (isinstance(item[3], int) and not isinstance(item[3], bool) and item[3] > 1)


def sum_dims(ds) -> Dim:
    total: Dim = 0
    for d in ds:
        total = total + d
    return total


@op("getitem", Arg("x", "tensor"), Arg("index", "any"), flops=lambda c, o: 0, category="shape")
def _getitem(c: OpCall):
    """x[i, a:b, ::s]: integer indices drop a dimension, slices keep it (bounds may be symbolic; a step
    is a positive integer, and a strided length ceil((b - a) / s) of a symbolic size must be exact)."""
    x = c.t("x")
    items = c.a("index")
    if not (isinstance(items, tuple) and all(_index_item(i) for i in items)):
        raise OpError("getitem: write indices as x[i, a:b], not as a call", "index")
    if len(items) > x.rank:
        raise OpError(f"index: too many indices ({len(items)}) for {shape_str(x)}", "index")
    shape: list[Dim] = []
    for axis, item in enumerate(items):
        n = x.shape[axis]
        if item[0] == "int":
            i = item[1]
            if isinstance(n, int) and not -n <= i < n:
                raise OpError(f"index: {i} is out of range for dimension {axis} of size {n}", f"index[{axis}]")
            if not isinstance(n, int) and (err := _index_bound_error(n, i + 1 if i >= 0 else -i, axis,
                                                                     f"index {i}", x, c)):
                raise err
            continue
        _, start, stop = item[:3]
        step = slice_step(item)
        start = 0 if start is None else start
        if stop is None:
            stop = n
        for name, b in (("start", start), ("stop", stop)):
            if isinstance(n, int) and isinstance(b, int) and not -n <= b <= n:
                raise OpError(f"index: slice {name} {b} is out of range for dimension {axis} of size {n}", f"index[{axis}]")
            if not isinstance(n, int) and isinstance(b, int) and b != 0 and \
                    (err := _index_bound_error(n, abs(b), axis, f"slice {name} {b}", x, c)):
                raise err
        start = start + n if isinstance(start, int) and start < 0 else start
        stop = stop + n if isinstance(stop, int) and stop < 0 else stop
        if not all(isinstance(v, int) for v in (n, start, stop)) and \
                (err := _slice_bound_error(n, start, stop, axis, x, c)):
            raise err
        length = stop - start
        if isinstance(length, int) and length <= 0:
            raise OpError(f"index: the slice of dimension {axis} is empty", f"index[{axis}]")
        if step != 1:
            strided = floor_div(length + (step - 1), step)  # ceil(length / step)
            if strided is None:
                raise OpError(f"index: the strided length of a symbolic dimension must be exact: dimension {axis} "
                              f"of {shape_str(x)} takes {fmt(length)} elements by steps of {step}, and "
                              f"ceil({fmt(length)} / {step}) is not a polynomial in its symbols; declare the "
                              f"dimension as a multiple of {step} (e.g. {step} * {_half_name(n, step)} in the input's "
                              f"type) or give it a fixed size", f"index[{axis}]")
            length = strided
        shape.append(length)
    shape.extend(x.shape[len(items):])
    return T(x.dtype, tuple(shape), x.value_range)


# ---------------------------------------------------------------------------------------------
# convolution, batch norm, pooling, resizing (channels first: [B, C, L] or [B, C, H, W])
# ---------------------------------------------------------------------------------------------

_LAYOUT = {1: "[B, C, L]", 2: "[B, C, H, W]"}
_SPATIAL = {1: ("L",), 2: ("H", "W")}


def _show(v) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return "true" if v is True else "false" if v is False else "none" if v is None else fmt(v)


def int_tuple(v, n: int, op_name: str, arg: str, lo: int = 1) -> tuple[int, ...]:
    """An integer, or (for n = 2) a pair of them, as an n-tuple; each at least `lo`."""
    ok_int = isinstance(v, int) and not isinstance(v, bool)
    if ok_int:
        vals = (v,) * n
    elif isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(x, int) and not isinstance(x, bool)
                                                              for x in v):
        vals = tuple(v)
    else:
        want = "an integer" + (f" or a list of {n} integers" if n > 1 else "")
        raise OpError(f"{op_name}: {arg} must be {want}, got {_show(v)}", arg)
    if any(x < lo for x in vals):
        raise OpError(f"{op_name}: {arg} must be {'positive' if lo == 1 else 'at least ' + str(lo)}, "
                      f"got {_show(v)}", arg)
    return vals


def floor_div(a: Dim, s: int) -> Dim | None:
    """floor(a / s) for a positive integer s, exact for every value of a's symbols, or None when that
    is not a polynomial (some symbolic coefficient is not a multiple of s)."""
    if isinstance(a, int):
        return a // s
    terms: dict = {}
    for mono, coef in a.terms:
        if mono == ():
            terms[()] = coef // s
        elif coef % s:
            return None
        else:
            terms[mono] = coef // s
    return Sym._norm(terms)


def _half_name(n: Dim, stride: int) -> str:
    """A name for n / stride in a hint: H -> Hq (H2 for a stride of 2), else S."""
    syms = sorted(symbols(n))
    return f"{syms[0]}{stride}" if len(syms) == 1 else "S"


def window_out(x: TensorType, axis: int, k: int, stride: int, pad: int, dilation: int, op_name: str,
               stride_arg: str = "stride") -> Dim:
    """Output size of a sliding window along `axis`: floor((n + 2p - d(k-1) - 1) / s) + 1."""
    n = x.shape[axis]
    reach = dilation * (k - 1) + 1
    span = n + 2 * pad - reach
    q = floor_div(span, stride)
    if q is None:
        raise OpError(f"{op_name}: dimension {axis} of x {shape_str(x)} is the symbolic size {fmt(n)}; with "
                      f"stride {stride} the output size floor({fmt(span)} / {stride}) + 1 is not a polynomial "
                      f"in it: give dimension {axis} a fixed size, or declare it as a multiple of {stride} "
                      f"(e.g. {stride} * {_half_name(n, stride)} in the input's type: the size is then "
                      f"{stride} times a symbol)", stride_arg)
    out = q + 1
    if isinstance(out, int) and out <= 0:
        what = f"kernel {k}" + (f" with dilation {dilation}" if dilation != 1 else "") + \
            (f" and padding {pad}" if pad else "")
        raise OpError(f"{op_name}: dimension {axis} of x {shape_str(x)} is {fmt(n)}, smaller than the window "
                      f"of {what} ({reach} wide): the output would be empty", "kernel")
    return out


def need_layout(x: TensorType, n: int, op_name: str) -> None:
    need_float(x, op_name)
    if x.rank != n + 2:
        raise OpError(f"{op_name}: expected x of layout {_LAYOUT[n]} (rank {n + 2}), got {shape_str(x)} "
                      f"(rank {x.rank})", "x")


def _conv_geometry(c: OpCall, n: int, name: str):
    """(in channels, kernel, stride, padding as pairs (before, after) or 'same', dilation)."""
    x = c.t("x")
    need_layout(x, n, name)
    cin = fixed_width(x.shape[1], name, "number of input channels (dimension 1 of x)")
    out, groups = c.a("out"), c.a("groups")
    if out <= 0:
        raise OpError(f"{name}: out must be positive, got {out}", "out")
    if groups <= 0:
        raise OpError(f"{name}: groups must be positive, got {groups}", "groups")
    if cin % groups:
        raise OpError(f"{name}: the {cin} input channels of x {shape_str(x)} are not divisible by groups={groups}",
                      "groups")
    if out % groups:
        raise OpError(f"{name}: out={out} is not divisible by groups={groups}", "out")
    kernel = int_tuple(c.a("kernel"), n, name, "kernel")
    stride = int_tuple(c.a("stride"), n, name, "stride")
    dilation = int_tuple(c.a("dilation"), n, name, "dilation")
    padding = c.a("padding")
    if padding == "valid":
        padding = 0
    if padding == "same":
        if any(s != 1 for s in stride):
            raise OpError(f"{name}: padding='same' needs stride 1, got stride={_show(c.a('stride'))}", "padding")
    elif isinstance(padding, str):
        raise OpError(f"{name}: padding must be an integer, a list of {n} integers, 'same' or 'valid', "
                      f"got {padding!r}", "padding")
    else:
        padding = int_tuple(padding, n, name, "padding", lo=0)
    return cin, kernel, stride, padding, dilation


def _conv(n: int):
    name = f"conv{n}d"

    def infer(c: OpCall):
        x = c.t("x")
        cin, kernel, stride, padding, dilation = _conv_geometry(c, n, name)
        spatial = []
        for i in range(n):
            if padding == "same":
                spatial.append(x.shape[2 + i])
            else:
                spatial.append(window_out(x, 2 + i, kernel[i], stride[i], padding[i], dilation[i], name))
        return T(x.dtype, (x.shape[0], c.a("out")) + tuple(spatial))

    def params(c: OpCall):
        cin, kernel, *_ = _conv_geometry(c, n, name)
        out, groups = c.a("out"), c.a("groups")
        fan_in = cin // groups * product(kernel)
        ps = [param("weight", (out, cin // groups) + kernel, uniform_fan_in(fan_in), op=name, arg="out")]
        if c.a("bias"):
            ps.append(param("bias", (out,), uniform_fan_in(fan_in), op=name, arg="out"))
        return ps

    def flops(c: OpCall, outs):
        x = c.t("x")
        per_output = x.shape[1] // c.a("groups") * product(int_tuple(c.a("kernel"), n, name, "kernel"))
        return 2 * numel(outs[0]) * per_output + (numel(outs[0]) if c.a("bias") else 0)

    infer.__doc__ = (
        f"{name}(x, out, kernel, stride=1, padding=0, dilation=1, groups=1, bias=true): a {n}-D convolution "
        f"of x {_LAYOUT[n]} -> [B, out, {', '.join(d + chr(39) for d in _SPATIAL[n])}].\n\n"
        + ("kernel, stride, padding and dilation are each an integer or a list of 2. " if n == 2 else "")
        + "padding may be 'same' (stride 1; the output keeps the input's size) or 'valid' (0). Each output "
        "size is floor((n + 2p - d(k-1) - 1) / s) + 1; a symbolic input size is allowed where that is exact "
        "(stride 1, or a size whose coefficients are multiples of the stride). Weights [out, C/groups, "
        "*kernel] and bias [out] start as PyTorch's defaults, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).")
    op(name, Arg("x", "tensor"), Arg("out", "int"), Arg("kernel", "any"), Arg("stride", "any", 1),
       Arg("padding", "any", 0), Arg("dilation", "any", 1), Arg("groups", "int", 1), Arg("bias", "bool", True),
       params=params, flops=flops, category="layer")(infer)


_conv(1)
_conv(2)


def _batch_norm_params(c: OpCall):
    x = c.t("x")
    ch = fixed_width(x.shape[1], "batch_norm", "number of channels (dimension 1 of x)")
    ps = []
    if c.a("affine"):
        ps += [param("weight", (ch,), Init("ones"), op="batch_norm"),
               param("bias", (ch,), Init("zeros"), op="batch_norm")]
    stats = [param("running_mean", (ch,), Init("zeros"), op="batch_norm"),
             param("running_var", (ch,), Init("ones"), op="batch_norm"),
             dataclasses.replace(param("num_batches_tracked", (), Init("zeros"), op="batch_norm"), dtype="i64")]
    return ps + [dataclasses.replace(p, buffer=True, frozen=True) for p in stats]


@op("batch_norm", Arg("x", "tensor"), Arg("eps", "float", 1e-5), Arg("momentum", "float", 0.1),
    Arg("affine", "bool", True), params=_batch_norm_params,
    flops=lambda c, o: (4 if c.a("affine") else 2) * numel(o[0]), category="layer")
def _batch_norm(c: OpCall):
    """batch_norm(x, eps=1e-5, momentum=0.1, affine=true): normalise each channel (dimension 1) of x
    [B, C], [B, C, L] or [B, C, H, W].

    Training uses the batch's statistics and updates the running ones (buffers running_mean,
    running_var, num_batches_tracked: stored with the weights, never trained); inference uses the
    running statistics: (x - mean) / sqrt(var + eps) * weight + bias. FLOPs count inference (4 per
    element, 2 without affine).
    """
    x = c.t("x")
    need_float(x, "batch_norm")
    if not 2 <= x.rank <= 4:
        raise OpError(f"batch_norm: expected x of layout [B, C], [B, C, L] or [B, C, H, W], got {shape_str(x)} "
                      f"(rank {x.rank})", "x")
    fixed_width(x.shape[1], "batch_norm", "number of channels (dimension 1 of x)")
    if not c.a("eps") > 0:
        raise OpError(f"batch_norm: eps must be positive, got {c.a('eps')}", "eps")
    if not 0.0 <= c.a("momentum") <= 1.0:
        raise OpError(f"batch_norm: momentum must be in [0, 1], got {c.a('momentum')}", "momentum")
    return x


def _pool(kind: str, n: int):
    name = f"{kind}_pool{n}d"

    def geometry(c: OpCall):
        x = c.t("x")
        need_layout(x, n, name)
        kernel = int_tuple(c.a("kernel"), n, name, "kernel")
        stride = kernel if c.a("stride") is None else int_tuple(c.a("stride"), n, name, "stride")
        padding = int_tuple(c.a("padding"), n, name, "padding", lo=0)
        for k, p in zip(kernel, padding):
            if 2 * p > k:
                raise OpError(f"{name}: padding {_show(c.a('padding'))} is more than half the kernel "
                              f"{_show(c.a('kernel'))}", "padding")
        return kernel, stride, padding

    def infer(c: OpCall):
        x = c.t("x")
        kernel, stride, padding = geometry(c)
        stride_arg = "kernel" if c.a("stride") is None else "stride"  # the stride defaults to the kernel
        spatial = tuple(window_out(x, 2 + i, kernel[i], stride[i], padding[i], 1, name, stride_arg)
                        for i in range(n))
        return T(x.dtype, x.shape[:2] + spatial)

    def flops(c: OpCall, outs):
        return numel(outs[0]) * product(geometry(c)[0])

    what = "maximum" if kind == "max" else "mean"
    infer.__doc__ = (f"{name}(x, kernel, stride=kernel, padding=0): the {what} over each window of x {_LAYOUT[n]}."
                     + ("\n\nPadded positions count as zeros in the mean (PyTorch's count_include_pad)."
                        if kind == "avg" else "\n\nPadded positions never win (they are -inf)."))
    op(name, Arg("x", "tensor"), Arg("kernel", "any"), Arg("stride", "any", None), Arg("padding", "any", 0),
       flops=flops, category="layer")(infer)


for _kind in ("max", "avg"):
    for _n in (1, 2):
        _pool(_kind, _n)


@op("adaptive_avg_pool2d", Arg("x", "tensor"), Arg("size", "any", 1),
    flops=lambda c, o: numel(c.t("x")) + numel(o[0]), category="layer")
def _adaptive_avg_pool2d(c: OpCall):
    """adaptive_avg_pool2d(x, size=1): x [B, C, H, W] -> [B, C, s, s] (size an integer or a list of 2), each
    output the mean of its share of the input; size 1 is global average pooling. FLOPs: one add per input
    element and one division per output (exact when size divides H and W)."""
    x = c.t("x")
    need_layout(x, 2, "adaptive_avg_pool2d")
    size = int_tuple(c.a("size"), 2, "adaptive_avg_pool2d", "size")
    for axis, s in zip((2, 3), size):
        if isinstance(x.shape[axis], int) and s > x.shape[axis]:
            raise OpError(f"adaptive_avg_pool2d: size {_show(c.a('size'))} is larger than dimension {axis} of x "
                          f"{shape_str(x)} ({x.shape[axis]})", "size")
    return T(x.dtype, x.shape[:2] + size)


_UPSAMPLE_COST = {"nearest": 0, "linear": 3, "bilinear": 9}


@op("upsample", Arg("x", "tensor"), Arg("scale", "int", 2), Arg("mode", "str", "nearest", tuple(_UPSAMPLE_COST)),
    flops=lambda c, o: _UPSAMPLE_COST[c.a("mode")] * numel(o[0]), category="layer")
def _upsample(c: OpCall):
    """upsample(x, scale=2, mode='nearest'): enlarge x [B, C, L] or [B, C, H, W] by an integer factor along
    each spatial dimension. mode 'nearest' repeats values; 'linear' (for [B, C, L]) and 'bilinear' (for
    [B, C, H, W]) interpolate with align_corners=false. FLOPs: 0, 3 or 9 per output element."""
    x = c.t("x")
    need_float(x, "upsample")
    mode, scale = c.a("mode"), c.a("scale")
    if x.rank not in (3, 4):
        raise OpError(f"upsample: expected x of layout [B, C, L] or [B, C, H, W], got {shape_str(x)} "
                      f"(rank {x.rank})", "x")
    if (mode == "linear" and x.rank != 3) or (mode == "bilinear" and x.rank != 4):
        want = "[B, C, L]" if mode == "linear" else "[B, C, H, W]"
        raise OpError(f"upsample: mode '{mode}' needs x of layout {want}, got {shape_str(x)}", "mode")
    if scale <= 0:
        raise OpError(f"upsample: scale must be a positive integer, got {scale}", "scale")
    return T(x.dtype, x.shape[:2] + tuple(d * scale for d in x.shape[2:]))


# ---------------------------------------------------------------------------------------------
# comparisons, selection and masks
# ---------------------------------------------------------------------------------------------

def broadcast_args(a: TensorType, b: TensorType, op_name: str, a_name: str, b_name: str) -> tuple[Dim, ...]:
    """The broadcast shape of two arguments; the error names both, and points at the second."""
    out: list[Dim] = []
    for i in range(1, max(a.rank, b.rank) + 1):
        da = a.shape[-i] if i <= a.rank else 1
        db = b.shape[-i] if i <= b.rank else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise OpError(f"{op_name}: cannot broadcast {a_name} {shape_str(a)} with {b_name} {shape_str(b)}: "
                          f"dimension -{i} is {fmt(da)} vs {fmt(db)}", b_name)
    return tuple(reversed(out))


def _compare(name: str, symbol: str):
    def infer(c: OpCall):
        x, y = c.t("x"), c.t("y")
        if (x.dtype == "bool") != (y.dtype == "bool"):
            raise OpError(f"{name}: cannot compare {shape_str(x)} with {shape_str(y)}: one is bool and the other "
                          f"is not; cast one of them first", "y")
        return T("bool", broadcast_args(x, y, name, "x", "y"))

    infer.__doc__ = f"{name}(x, y) or x {symbol} y: elementwise comparison with broadcasting, a bool tensor."
    op(name, Arg("x", "tensor"), Arg("y", "tensor"), flops=elementwise_flops, category="comparison")(infer)


COMPARE_OPS = {"==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge"}
for _symbol, _name in COMPARE_OPS.items():
    _compare(_name, _symbol)
BINARY_OPS.update(COMPARE_OPS)

#: Tensor arguments that a spec may give as a plain number (the elaborator makes it a scalar of the
#: dtype of the op's other tensor argument), e.g. where(mask, x, 0.0) or lt(x, 0).
NUMBER_ARGS: dict[str, tuple[str, ...]] = {"where": ("x", "y"), "maximum": ("x", "y"), "minimum": ("x", "y"),
                                           **{n: ("x", "y") for n in COMPARE_OPS.values()}}


def _need_bool(t: TensorType, op_name: str, arg: str) -> None:
    if t.dtype != "bool":
        raise OpError(f"{op_name}: '{arg}' must be a bool tensor, got {shape_str(t)}; compare it (e.g. {arg} > 0) "
                      f"or cast({arg}, bool) first", arg)


def _logical(name: str, doc: str, arity: int):
    def infer(c: OpCall):
        x = c.t("x")
        _need_bool(x, name, "x")
        if arity == 1:
            return T("bool", x.shape)
        y = c.t("y")
        _need_bool(y, name, "y")
        return T("bool", broadcast_args(x, y, name, "x", "y"))

    infer.__doc__ = doc
    args = (Arg("x", "tensor"),) + ((Arg("y", "tensor"),) if arity == 2 else ())
    op(name, *args, flops=elementwise_flops, category="elementwise")(infer)


_logical("logical_and", "logical_and(x, y) or x and y: elementwise and of bool tensors, with broadcasting.", 2)
_logical("logical_or", "logical_or(x, y) or x or y: elementwise or of bool tensors, with broadcasting.", 2)
_logical("logical_not", "logical_not(x) or not x: elementwise negation of a bool tensor.", 1)


@op("where", Arg("cond", "tensor"), Arg("x", "tensor"), Arg("y", "tensor"), flops=elementwise_flops,
    category="elementwise")
def _where(c: OpCall):
    """where(cond, x, y): x where cond is true, else y; cond, x and y broadcast together. x or y may be a
    number, e.g. where(keep, h, 0.0)."""
    cond, x, y = c.t("cond"), c.t("x"), c.t("y")
    _need_bool(cond, "where", "cond")
    if (x.dtype == "bool") != (y.dtype == "bool"):
        raise OpError(f"where: cannot choose between x {shape_str(x)} and y {shape_str(y)}: one is bool and the "
                      f"other is not", "y")
    shape = broadcast_args(T(x.dtype, broadcast_args(cond, x, "where", "cond", "x")), y, "where", "cond and x", "y")
    return T(promote(x.dtype, y.dtype, "where"), shape)


@op("masked_fill", Arg("x", "tensor"), Arg("mask", "tensor"), Arg("value", "number"), flops=elementwise_flops,
    category="elementwise")
def _masked_fill(c: OpCall):
    """masked_fill(x, mask, value): x with `value` wherever the bool mask (broadcast to x's shape) is true."""
    x, mask, value = c.t("x"), c.t("mask"), c.a("value")
    _need_bool(mask, "masked_fill", "mask")
    if x.dtype == "bool":
        raise OpError(f"masked_fill: x {shape_str(x)} is bool; use where or logical_and/logical_or", "x")
    if isinstance(value, float) and math.isnan(value):
        raise OpError(f"masked_fill: value must be a number, got {value}", "value")
    if isinstance(value, float) and math.isinf(value) and x.dtype not in FLOAT_DTYPES:
        raise OpError(f"masked_fill: x {shape_str(x)} is an integer tensor, which cannot hold {value}", "value")
    if x.dtype not in FLOAT_DTYPES and isinstance(value, float) and not value.is_integer():
        raise OpError(f"masked_fill: x {shape_str(x)} is an integer tensor but value {value} is not an integer",
                      "value")
    shape = broadcast_args(x, mask, "masked_fill", "x", "mask")
    if shape != x.shape:
        axis = next(i for i in range(1, len(shape) + 1) if i > x.rank or shape[-i] != x.shape[-i])
        raise OpError(f"masked_fill: the mask {shape_str(mask)} would enlarge x {shape_str(x)} to {dims_str(shape)} "
                      f"(dimension -{axis}); the mask must broadcast to x's shape", "mask")
    return T(x.dtype, x.shape)


def _triangle(name: str, part: str):
    def infer(c: OpCall):
        x = c.t("x")
        need_rank(x, 2, name)
        return T(x.dtype, x.shape)

    infer.__doc__ = (f"{name}(x, diagonal=0): the {part} triangle of the last two dimensions of x (others set to "
                     f"0 or false); diagonal k > 0 moves the border above the main diagonal, k < 0 below. "
                     f"With ones(T, T, dtype=bool) it builds masks: tril gives the causal mask.")
    op(name, Arg("x", "tensor"), Arg("diagonal", "int", 0), flops=elementwise_flops, category="elementwise")(infer)


_triangle("tril", "lower")
_triangle("triu", "upper")


def _filled(name: str, value: int):
    def infer(c: OpCall):
        shape = tuple(c.a("shape"))
        if not shape:
            raise OpError(f"{name}: give at least one size, e.g. {name}(T, T)", "shape")
        for d in shape:
            if isinstance(d, int) and d <= 0:
                raise OpError(f"{name}: sizes must be positive, got {dims_str(shape)}", "shape")
        return T(c.a("dtype"), shape, (value, value + 1) if c.a("dtype") in INT_DTYPES else None)

    infer.__doc__ = (f"{name}(d0, d1, ..., dtype=f32): a tensor of {value}s (or {'true' if value else 'false'} for "
                     f"bool); sizes may be symbolic, e.g. tril({name}(T, T, dtype=bool)).")
    op(name, Arg("shape", "dims", variadic=True), Arg("dtype", "dtype", "f32"), flops=lambda c, o: 0)(infer)


_filled("ones", 1)
_filled("zeros", 0)


def _parameter_params(c: OpCall):
    return [param("weight", tuple(c.a("shape")), Init("normal", (1.0, 0.0)), op="parameter", arg="shape")]


@op("parameter", Arg("shape", "dims", variadic=True), params=_parameter_params, flops=lambda c, o: 0,
    category="layer")
def _parameter(c: OpCall):
    """parameter(d0, d1, ...): a learned f32 tensor of fixed shape (prefix rows, prompt components, key
    tokens...), initialised N(0, 1) unless init= says otherwise; frozen=, init= and share= apply."""
    shape = tuple(c.a("shape"))
    if not shape:
        raise OpError("parameter: give at least one size, e.g. parameter(L, d_model)", "shape")
    for d in shape:
        if not isinstance(d, int):
            raise OpError(f"parameter: sizes must be fixed by params, but {fmt(d)} is a symbolic dimension", "shape")
        if d <= 0:
            raise OpError(f"parameter: sizes must be positive, got {dims_str(shape)}", "shape")
    return T("f32", shape)


# ---------------------------------------------------------------------------------------------
# position embeddings
# ---------------------------------------------------------------------------------------------

def _rotary_flops(c: OpCall, outs):
    x, pos = c.t("x"), c.t("positions")
    angles = (numel(pos) if pos is not None else x.shape[-2]) * (x.shape[-1] // 2)
    return 3 * numel(outs[0]) + 3 * angles  # x*cos + rotate_half(x)*sin; angle, cos and sin per table entry


@op("rotary", Arg("x", "tensor"), Arg("positions", "tensor?", None), Arg("base", "float", 10000.0),
    flops=_rotary_flops, category="layer")
def _rotary(c: OpCall):
    """rotary(x, positions=none, base=10000.0): rotary position embedding (RoPE) over the last dimension of x
    [..., T, d] (d even), e.g. queries or keys [B, T, d] or, per head, [B, heads, T, d].

    The GPT-NeoX / LLaMA (Hugging Face) "rotate half" convention: channel i is paired with channel
    i + d/2, and the pair turns by the angle p * base ** (-2i / d) at position p:
    y = x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[..., d/2:], x[..., :d/2]).
    (Not the interleaved pairs (2i, 2i+1) of the original RoFormer / GPT-J.) positions: integers [T], or
    [B, T] per batch row (B = dimension 0 of x); default arange(T).
    """
    x, pos = c.t("x"), c.t("positions")
    need_float(x, "rotary")
    need_rank(x, 2, "rotary")
    d = fixed_width(x.shape[-1], "rotary", "rotated width (last dimension of x)")
    if d % 2:
        raise OpError(f"rotary: the last dimension of x {shape_str(x)} must be even, got {d}", "x")
    if not c.a("base") > 0:
        raise OpError(f"rotary: base must be positive, got {c.a('base')}", "base")
    if pos is not None:
        if pos.dtype not in INT_DTYPES:
            raise OpError(f"rotary: positions must be an integer tensor, got {shape_str(pos)}", "positions")
        t = x.shape[-2]
        if pos.rank == 1:
            if pos.shape[0] != t:
                raise OpError(f"rotary: positions {shape_str(pos)} do not fit x {shape_str(x)}: dimension 0 of "
                              f"positions is {fmt(pos.shape[0])}, dimension {x.rank - 2} of x (T) is {fmt(t)}",
                              "positions")
        elif pos.rank == 2:
            if x.rank < 3:
                raise OpError(f"rotary: positions {shape_str(pos)} are per batch row [B, T], but x {shape_str(x)} "
                              f"has no batch dimension", "positions")
            for pi, xi, what in ((0, 0, "B"), (1, x.rank - 2, "T")):
                if pos.shape[pi] != x.shape[xi]:
                    raise OpError(f"rotary: positions {shape_str(pos)} do not fit x {shape_str(x)}: dimension {pi} "
                                  f"of positions is {fmt(pos.shape[pi])}, dimension {xi} of x ({what}) is "
                                  f"{fmt(x.shape[xi])}", "positions")
        else:
            raise OpError(f"rotary: positions must be [T] or [B, T], got {shape_str(pos)}", "positions")
    return T(x.dtype, x.shape)


from . import ops_gradient  # noqa: E402,F401  (grad_reverse; registers on import)

from . import ops_attention  # noqa: E402,F401  (attend: attention over given q, k, v)
from . import ops_image, ops_moe, ops_select  # noqa: E402,F401  (zoo families: rot90; moe_mlp; amax/argmax/gather/unsqueeze)
from . import ops_memory  # noqa: E402,F401  (omega_memory: ATLAS's test-time memory, the Omega rule)
from . import ops_detach  # noqa: E402,F401  (detach: a stop-gradient for layer-local losses)
from . import ops_flow  # noqa: E402,F401  (warp, splat, correlation: SplatFlow's flow operators)
