"""PyTorch lowerings, keyed by op name: how each IR op reads in generated source.

A lowering gives the Python expression of a node from its inputs' expressions, and for ops with
parameters the constructor of the submodule that holds them. Ops this backend cannot lower are
listed in UNSUPPORTED (a test checks that every registered op is in one table or the other).
"""

from __future__ import annotations

import keyword
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from specc.compiler.dims import Sym
from specc.compiler.ir import DTYPES, FLOAT_DTYPES, Node, slice_step

# Python operator precedences, for parenthesising inlined expressions.
ATOM, POW, UNARY, MUL, ADD, BITAND, BITOR, CMP = 100, 7, 6, 5, 4, 3, 2, 1


@dataclass(frozen=True)
class Expr:
    text: str
    prec: int = ATOM

    def at(self, prec: int) -> str:
        """The text, parenthesised if it binds looser than `prec`."""
        return self.text if self.prec >= prec else f"({self.text})"


@dataclass
class Ctx:
    """What a lowering sees: the node, and how to spell dimensions and the module attribute."""

    node: Node
    dim: Callable[[Any], str]
    device: str
    helpers: set[str] = field(default_factory=set)
    #: the IR dtypes of the node's inputs, in order
    in_dtypes: tuple[str, ...] = ()
    #: the values of the inputs that are scalar constants, None for the others: Python numbers in the
    #: source, which take no part in torch's choice of a result dtype
    in_scalars: tuple[Any, ...] = ()
    #: the source of the module's float dtype (see `dtype`), and a set that records its use
    float_dtype: str = "torch.float32"
    uses: set[str] = field(default_factory=set)

    def dtype(self, dtype: str) -> str:
        """The torch dtype of an IR dtype, as source. f32, the IR's default float, is the module's float
        dtype (`self.dtype_ref.dtype`: float32 until `.double()`, `.half()` or `.to(dtype)` converts the
        module), so the floats a model creates from integers, booleans and literals stay in the
        precision it runs in; every other dtype is fixed (an f64 value stays float64)."""
        if dtype != "f32":
            return f"torch.{DTYPES[dtype]}"
        self.uses.add("float_dtype")
        return self.float_dtype

    def creates_float(self) -> bool:
        """Whether this node's f32 result has no float tensor among its inputs, so that torch would take
        its dtype from the default dtype (integer tensors with float literals, true division of integers,
        where() between literals) instead of from the module's float dtype."""
        if self.x.dtype != "f32":
            return False
        return not any(d in FLOAT_DTYPES and not lit for d, lit in zip(self.in_dtypes, self.literals()))

    def literals(self) -> tuple[bool, ...]:
        """Whether each input is a scalar constant."""
        scalars = self.in_scalars or (None,) * len(self.in_dtypes)
        return tuple(v is not None for v in scalars)

    def as_float(self, xs: list["Expr"], among: range | None = None) -> list["Expr"]:
        """The inputs with the first non-literal one of `among` (default: all) converted to the module's
        float dtype, where the node creates floats (`creates_float`); torch's promotion then computes the
        result in that dtype. Unchanged otherwise, or where every such input is a literal."""
        if not self.creates_float():
            return xs
        lits = self.literals()
        for i in among if among is not None else range(len(xs)):
            if not lits[i]:
                out = list(xs)
                out[i] = call(f"{xs[i].at(ATOM)}.to({self.dtype('f32')})")
                return out
        return xs

    def as_index(self, i: int, x: "Expr", ok: tuple[str, ...] = ("i64",)) -> str:
        """Input i as an index tensor torch takes: `.long()` unless its dtype is one of `ok`."""
        if i < len(self.in_dtypes) and self.in_dtypes[i] not in ok:
            return f"{x.at(ATOM)}.long()"
        return x.text

    def a(self, key: str) -> Any:
        return self.node.attr(key)

    @property
    def module(self) -> str:
        return f"self.{self.node.path[-1]}"

    @property
    def x(self):
        return self.node.outputs[0]


def lit(v: Any) -> str:
    """A Python literal for an attribute value (only numbers, bools, None and validated strings)."""
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(lit(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    raise TypeError(f"no literal for {v!r}")  # pragma: no cover


@dataclass(frozen=True)
class Lowering:
    expr: Callable[[Ctx, list[Expr]], Expr]
    init: Callable[[Ctx, "InTypes"], str] | None = None
    helpers: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()  # Python modules the generated code must import (custom operators)


InTypes = list  # the input TensorTypes of the node, in order


def call(text: str) -> Expr:
    return Expr(text, ATOM)


def _fn(name: str, **fixed: Any):
    def lower(c: Ctx, xs: list[Expr]) -> Expr:
        extra = "".join(f", {k}={lit(v)}" for k, v in fixed.items())
        return call(f"{name}({xs[0].text}{extra})")

    return lower


def _binop(symbol: str, prec: int):
    def lower(c: Ctx, xs: list[Expr]) -> Expr:
        xs = c.as_float(xs)  # ids * 0.5, ids / n: in the module's float dtype
        right_prec = prec + 1 if symbol != "**" else prec
        left_prec = prec if symbol != "**" else prec + 1
        return Expr(f"{xs[0].at(left_prec)} {symbol} {xs[1].at(right_prec)}", prec)

    return lower


def num(v: float | int) -> str:
    """A number as Python source, large and tiny ones short: -1e9 rather than -1000000000.0, 1e-5 rather
    than 1e-05 (the same float); 500.0 and 0.1 as repr writes them."""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if math.isinf(v):  # the spec's inf / -inf
        return 'float("inf")' if v > 0 else 'float("-inf")'
    text = repr(float(v))
    if "e" not in text and abs(v) < 1e6:
        return text
    mantissa, exp = f"{v:.15e}".split("e")
    short = f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return short if len(short) < len(text) and float(short) == v else text


def _scalar(c: Ctx, xs: list[Expr]) -> Expr:
    v = c.a("value")
    if c.a("dtype") in ("f16", "bf16", "f32", "f64"):
        text = num(float(v)) if math.isinf(v) else repr(float(v))
    else:
        text = str(int(v))
    return Expr(text, ATOM if not text.startswith("-") else UNARY)


def _with_floats(name: str, *keys: str, defaults: tuple[float, ...]):
    """name(x, key=value, ...), each float attribute written only where it is not torch's default."""

    def lower(c: Ctx, xs: list[Expr]) -> Expr:
        extra = "".join(f", {k}={num(c.a(k))}" for k, d in zip(keys, defaults) if c.a(k) != d)
        return call(f"{name}({xs[0].text}{extra})")

    return lower


def _gelu(c: Ctx, xs: list[Expr]) -> Expr:
    if c.a("approximate") == "tanh":
        return call(f"F.gelu({xs[0].text}, approximate='tanh')")
    return call(f"F.gelu({xs[0].text})")


def _axes(v: Any) -> str:
    return lit(tuple(v)) if isinstance(v, (list, tuple)) else str(v)


def _reduce(name: str):
    def lower(c: Ctx, xs: list[Expr]) -> Expr:
        dim, keep = c.a("dim"), c.a("keepdim")
        if dim is None and not keep:
            return call(f"{xs[0].at(ATOM)}.{name}()")
        if dim is None:
            dim = tuple(range(c.node.outputs[0].rank))
        return call(f"{xs[0].at(ATOM)}.{name}(dim={_axes(dim)}" + (", keepdim=True)" if keep else ")"))

    return lower


def _cumsum(c: Ctx, xs: list[Expr]) -> Expr:
    """torch.cumsum along dim; reverse: of x flipped along it, flipped back."""
    d = c.a("dim")
    if c.a("reverse"):
        return call(f"{xs[0].at(ATOM)}.flip({d}).cumsum({d}).flip({d})")
    return call(f"{xs[0].at(ATOM)}.cumsum({d})")


def _getitem(c: Ctx, xs: list[Expr]) -> Expr:
    parts = []
    for it in c.a("index"):
        if it[0] == "int":
            parts.append(str(it[1]))
        else:
            s = "" if it[1] is None else c.dim(it[1])
            e = "" if it[2] is None else c.dim(it[2])
            step = slice_step(it)
            parts.append(f"{s}:{e}" + (f":{step}" if step != 1 else ""))
    return call(f"{xs[0].at(ATOM)}[{', '.join(parts)}]")


def _arange(c: Ctx, xs: list[Expr]) -> Expr:
    return call(f"torch.arange({c.dim(c.a('n'))}, dtype={c.dtype(c.a('dtype'))}, device={c.device})")


def _norm_dim(c: Ctx) -> int | None:
    """The dimension a layer_norm / rms_norm normalises over, as written (e.g. 1 or -3), or None for the
    last one (nn.LayerNorm's and nn.RMSNorm's own)."""
    dim, rank = c.a("dim"), c.node.outputs[0].rank
    return None if dim is None or dim % rank == rank - 1 else dim


def _norm_width(c: Ctx, ins: InTypes) -> int:
    """The size of the normalised dimension: the width of the norm's weight."""
    return ins[0].shape[-1 if _norm_dim(c) is None else _norm_dim(c)]


def _layer_norm_init(c: Ctx, ins: InTypes) -> str:
    return (f"nn.LayerNorm({_norm_width(c, ins)}, eps={lit(c.a('eps'))}"
            + (", bias=False" if not c.a("bias") else "") + ")")


def _norm_call(c: Ctx, xs: list[Expr], fn: str) -> Expr:
    """A layer_norm / rms_norm: the module (affine) or F.<fn> over the last dimension; over another
    dimension, the same on x with that dimension moved last, and moved back after
    (`self.norm(x.movedim(1, -1)).movedim(-1, 1)`: ConvNeXt's channels-first LayerNorm)."""
    dim = _norm_dim(c)
    x = xs[0].text if dim is None else f"{xs[0].at(ATOM)}.movedim({dim}, -1)"
    if c.a("affine"):
        text = f"{c.module}({x})"
    else:
        d = c.node.outputs[0].shape[-1 if dim is None else dim]
        text = f"F.{fn}({x}, ({c.dim(d)},), eps={lit(c.a('eps'))})"
    return call(text if dim is None else f"{text}.movedim(-1, {dim})")


def _layer_norm(c: Ctx, xs: list[Expr]) -> Expr:
    return _norm_call(c, xs, "layer_norm")


def _rms_norm(c: Ctx, xs: list[Expr]) -> Expr:
    return _norm_call(c, xs, "rms_norm")


def _compare(symbol: str):
    def lower(c: Ctx, xs: list[Expr]) -> Expr:  # never chained: (a < b) < c is not a < b < c
        return Expr(f"{xs[0].at(CMP + 1)} {symbol} {xs[1].at(CMP + 1)}", CMP)

    return lower


def _args(*parts: str, **options: Any) -> str:
    """Positional parts, then keyword options that are not None."""
    return ", ".join(list(parts) + [f"{k}={v}" for k, v in options.items() if v is not None])


def _size(v: Any) -> str:
    """A kernel/stride/padding attribute as written for torch: 3, (3, 1) or 'same'."""
    if isinstance(v, (list, tuple)) and len(set(v)) == 1:
        return lit(v[0])
    return lit(v)


def _conv_init(n: int):
    def init(c: Ctx, ins: InTypes) -> str:
        padding, stride, dilation, groups = c.a("padding"), c.a("stride"), c.a("dilation"), c.a("groups")
        return f"nn.Conv{n}d(" + _args(
            str(ins[0].shape[1]), str(c.a("out")), _size(c.a("kernel")),
            stride=None if stride in (1, [1] * n, (1,) * n) else _size(stride),
            padding=None if padding in (0, [0] * n, (0,) * n, "valid") else _size(padding),
            dilation=None if dilation in (1, [1] * n, (1,) * n) else _size(dilation),
            groups=None if groups == 1 else str(groups),
            bias=None if c.a("bias") else "False") + ")"

    return init


def _batch_norm_init(c: Ctx, ins: InTypes) -> str:
    kind = "BatchNorm2d" if ins[0].rank == 4 else "BatchNorm1d"
    return f"nn.{kind}(" + _args(
        str(ins[0].shape[1]), eps=None if c.a("eps") == 1e-5 else num(c.a("eps")),
        momentum=None if c.a("momentum") == 0.1 else num(c.a("momentum")),
        affine=None if c.a("affine") else "False") + ")"


def _pool(name: str):
    def lower(c: Ctx, xs: list[Expr]) -> Expr:
        n = c.x.rank - 2
        stride, padding = c.a("stride"), c.a("padding")
        same_stride = stride is None or _size(stride) == _size(c.a("kernel"))
        return call(f"F.{name}(" + _args(
            xs[0].text, _size(c.a("kernel")), stride=None if same_stride else _size(stride),
            padding=None if padding in (0, [0] * n, (0,) * n) else _size(padding)) + ")")

    return lower


def _upsample(c: Ctx, xs: list[Expr]) -> Expr:
    return call(f"F.interpolate({xs[0].text}, scale_factor={c.a('scale')}, mode={lit(c.a('mode'))})")


def _filled(name: str):
    def lower(c: Ctx, xs: list[Expr]) -> Expr:
        sizes = ", ".join(c.dim(d) for d in c.a("shape"))
        return call(f"torch.{name}({sizes}, dtype={c.dtype(c.a('dtype'))}, device={c.device})")

    return lower


def _exact_f32(v: Any) -> bool:
    """Whether the number v is a float32 value (then a float32 result converted to a wider dtype holds
    it exactly)."""
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0] == v
    except OverflowError:  # beyond float32's range
        return False


def _extremum(name: str):
    """torch.maximum / torch.minimum of two tensors; beside a literal (which torch.maximum does not take) the
    tensor's clamp, the same values (nan stays nan); between two literals the constant itself."""
    bound = "min" if name == "maximum" else "max"

    def lower(c: Ctx, xs: list[Expr]) -> Expr:
        xs = c.as_float(xs)
        lits = c.literals()
        if all(lits):
            v = (max if name == "maximum" else min)(*c.in_scalars)
            return call(f"torch.tensor({num(v)}, dtype={c.dtype(c.x.dtype)}, device={c.device})")
        if lits[0] or lits[1]:
            t, v = (xs[1], xs[0]) if lits[0] else (xs[0], xs[1])
            return call(f"{t.at(ATOM)}.clamp({bound}={v.text})")
        return call(f"torch.{name}({xs[0].text}, {xs[1].text})")

    return lower


def _clamp(c: Ctx, xs: list[Expr]) -> Expr:
    xs = c.as_float(xs)
    bounds = ", ".join(f"{k}={num(c.a(k))}" for k in ("min", "max") if c.a(k) is not None)
    return call(f"{xs[0].at(ATOM)}.clamp({bounds})")


def _where(c: Ctx, xs: list[Expr]) -> Expr:
    """torch.where(cond, x, y). Where the result is f32 but neither x nor y a float tensor, it takes the
    module's float dtype: an integer x or y is converted first; between two literals, the result is
    converted (exact for literals float32 holds: 1.0, 0.0, -inf), or x becomes a tensor of that dtype."""
    xs = c.as_float(xs, range(1, 3))
    if not c.creates_float() or not all(c.literals()[1:]):
        return call(f"torch.where({', '.join(x.text for x in xs)})")
    if all(_exact_f32(v) for v in c.in_scalars[1:]):
        return call(f"torch.where({', '.join(x.text for x in xs)}).to({c.dtype('f32')})")
    x = f"torch.tensor({xs[1].text}, dtype={c.dtype('f32')}, device={c.device})"
    return call(f"torch.where({xs[0].text}, {x}, {xs[2].text})")


def _triangle(name: str):
    def lower(c: Ctx, xs: list[Expr]) -> Expr:
        k = c.a("diagonal")
        return call(f"{xs[0].at(ATOM)}.{name}({k if k else ''})")

    return lower


def _rotary(c: Ctx, xs: list[Expr]) -> Expr:
    base = c.a("base")
    return call("apply_rotary(" + _args(xs[0].text, positions=xs[1].text if len(xs) > 1 else None,
                                        base=None if base == 10000.0 else num(base)) + ")")


def _attention_call(c: Ctx, xs: list[Expr]) -> Expr:
    """self.attention(x), self.attention(x, kv), self.attention(x, mask=m, prefix=p), ..."""
    parts = [xs[0].text]
    i = 1
    if c.a("kv?"):
        parts.append(xs[i].text)
        i += 1
    for option in ("mask", "prefix"):
        if c.a(f"{option}?"):
            parts.append(f"{option}={xs[i].text}")
            i += 1
    return call(f"{c.module}({', '.join(parts)})")


def _attention_init(c: Ctx, ins: InTypes) -> str:
    x = ins[0]
    args = [str(x.shape[-1]), f"heads={c.a('heads')}"]
    if c.a("causal"):
        args.append("causal=True")
    if c.a("kv?"):
        args.append(f"kv_dim={ins[1].shape[-1]}")
    if not c.a("bias"):
        args.append("bias=False")
    if c.a("dropout"):
        args.append(f"dropout={lit(c.a('dropout'))}")
    if c.a("qkv"):
        args.append("fused_qkv=True")
    if c.a("impl") == "sdpa":
        args.append("sdpa=True")
    if c.a("head_dim") is not None:
        args.append(f"head_dim={c.a('head_dim')}")
    if c.node.attr("rope") is not None:
        args.append(f"rope={lit(float(c.a('rope')))}")
        if c.node.attr("rope_dim") is not None:
            args.append(f"rope_dim={c.a('rope_dim')}")
        c.helpers.add("apply_rotary")
    kv_heads = c.node.attr("kv_heads")
    if kv_heads is not None and kv_heads != c.a("heads"):  # grouped-query attention: a subclass, so that
        c.helpers.add("MultiHeadAttentionGQA")  # plain attention's generated code stays as it was
        args.insert(2, f"kv_heads={kv_heads}")
        return f"MultiHeadAttentionGQA({', '.join(args)})"
    return f"MultiHeadAttention({', '.join(args)})"


def _mlp_init(c: Ctx, ins: InTypes) -> str:
    d = ins[0].shape[-1]
    args = [str(d), str(c.a("hidden"))]
    if c.a("out") and c.a("out") != d:
        args.append(f"out={c.a('out')}")
    if c.a("act") != "gelu":
        args.append(f"act={lit(c.a('act'))}")
    if not c.a("bias"):
        args.append("bias=False")
    if c.a("dropout"):
        args.append(f"dropout={lit(c.a('dropout'))}")
    return f"MLP({', '.join(args)})"


def _recurrent_init(cls: str) -> Callable[[Ctx, InTypes], str]:
    """nn.LSTM / nn.GRU(d, hidden, num_layers=, batch_first=True, bidirectional=): the spec's parameters
    are theirs, by name and layout."""
    def init(c: Ctx, ins: InTypes) -> str:
        args = [str(ins[0].shape[-1]), str(c.a("hidden"))]
        if c.a("layers") != 1:
            args.append(f"num_layers={c.a('layers')}")
        args.append("batch_first=True")
        if c.a("bidirectional"):
            args.append("bidirectional=True")
        return f"{cls}({', '.join(args)})"
    return init


def _module_call(c: Ctx, xs: list[Expr]) -> Expr:
    return call(f"{c.module}({', '.join(x.text for x in xs)})")


LOWERINGS: dict[str, Lowering] = {
    "input": Lowering(lambda c, xs: call(c.a("name"))),
    "scalar": Lowering(_scalar),
    "arange": Lowering(_arange),
    "cast": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.to({c.dtype(c.a('dtype'))})")),
    "relu": Lowering(_fn("F.relu")),
    "gelu": Lowering(_gelu),
    "silu": Lowering(_fn("F.silu")),
    "tanh": Lowering(_fn("torch.tanh")),
    "sigmoid": Lowering(_fn("torch.sigmoid")),
    "exp": Lowering(_fn("torch.exp")),
    "log": Lowering(_fn("torch.log")),
    "sqrt": Lowering(_fn("torch.sqrt")),
    "abs": Lowering(_fn("torch.abs")),
    "neg": Lowering(lambda c, xs: Expr(f"-{xs[0].at(UNARY)}", UNARY)),
    "sin": Lowering(_fn("torch.sin")),
    "cos": Lowering(_fn("torch.cos")),
    "rsqrt": Lowering(_fn("torch.rsqrt")),
    "erf": Lowering(_fn("torch.erf")),
    "floor": Lowering(_fn("torch.floor")),
    "ceil": Lowering(_fn("torch.ceil")),
    "round": Lowering(_fn("torch.round")),
    "sign": Lowering(_fn("torch.sign")),
    "softplus": Lowering(_with_floats("F.softplus", "beta", "threshold", defaults=(1.0, 20.0))),
    "leaky_relu": Lowering(_with_floats("F.leaky_relu", "negative_slope", defaults=(0.01,))),
    "elu": Lowering(_with_floats("F.elu", "alpha", defaults=(1.0,))),
    "hardswish": Lowering(_fn("F.hardswish")),
    "mish": Lowering(_fn("F.mish")),
    "add": Lowering(_binop("+", ADD)),
    "sub": Lowering(_binop("-", ADD)),
    "mul": Lowering(_binop("*", MUL)),
    "div": Lowering(_binop("/", MUL)),
    "pow": Lowering(_binop("**", POW)),
    "floordiv": Lowering(_binop("//", MUL)),  # torch.floor_divide: rounding_mode="floor"
    "mod": Lowering(_binop("%", MUL)),  # torch.remainder: the sign of the divisor
    "matmul": Lowering(_binop("@", MUL)),
    "linear": Lowering(_module_call, lambda c, ins: f"nn.Linear({ins[0].shape[-1]}, {c.a('out')}"
                                                      + (", bias=False)" if not c.a("bias") else ")")),
    # one_hot is f32 in the IR: the module's float dtype, so a float64 copy of the model stays in float64
    "one_hot": Lowering(lambda c, xs: call(f"F.one_hot({c.as_index(0, xs[0])}, {c.a('num')}).to({c.dtype('f32')})")),
    "embedding": Lowering(lambda c, xs: call(f"{c.module}({c.as_index(0, xs[0], ('i64', 'i32'))})"), lambda c, ins: f"nn.Embedding({c.a('num')}, {c.a('dim')})"),
    "layer_norm": Lowering(_layer_norm, lambda c, ins: _layer_norm_init(c, ins) if c.a("affine") else ""),
    "rms_norm": Lowering(_rms_norm, lambda c, ins: f"nn.RMSNorm({_norm_width(c, ins)}, eps={lit(c.a('eps'))})"
                         if c.a("affine") else ""),
    "dropout": Lowering(lambda c, xs: call(f"F.dropout({xs[0].text}, p={lit(c.a('p'))}, training=self.training)")),
    "attention": Lowering(_attention_call, _attention_init, ("MultiHeadAttention",)),
    "mlp": Lowering(_module_call, _mlp_init, ("MLP",)),
    "lstm": Lowering(lambda c, xs: call(f"{c.module}({xs[0].text})[0]"), _recurrent_init("nn.LSTM")),
    "gru": Lowering(lambda c, xs: call(f"{c.module}({xs[0].text})[0]"), _recurrent_init("nn.GRU")),
    "softmax": Lowering(lambda c, xs: call(f"F.softmax({xs[0].text}, dim={c.a('dim')})")),
    "mean": Lowering(_reduce("mean")),
    "sum": Lowering(_reduce("sum")),
    "cumsum": Lowering(_cumsum),
    "transpose": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.transpose({c.a('dim0')}, {c.a('dim1')})")),
    "permute": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.permute({', '.join(map(str, c.a('dims')))})")),
    "reshape": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.reshape({', '.join(c.dim(d) for d in c.a('shape'))})")),
    "expand": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.expand({', '.join(c.dim(d) for d in c.a('shape'))})")),
    "concat": Lowering(lambda c, xs: call(f"torch.cat([{', '.join(x.text for x in xs)}], dim={c.a('dim')})")),
    "stack": Lowering(lambda c, xs: call(f"torch.stack([{', '.join(x.text for x in xs)}], dim={c.a('dim')})")),
    "flip": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.flip({_axes(c.a('dims'))})")),
    "split": Lowering(lambda c, xs: call(
        f"torch.split({xs[0].text}, [{', '.join(c.dim(t.shape[c.a('dim')]) for t in c.node.outputs)}], "
        f"dim={c.a('dim')})")),
    "getitem": Lowering(_getitem),
    # convolutional models
    "conv1d": Lowering(_module_call, _conv_init(1)),
    "conv2d": Lowering(_module_call, _conv_init(2)),
    "batch_norm": Lowering(_module_call, _batch_norm_init),
    "max_pool1d": Lowering(_pool("max_pool1d")),
    "max_pool2d": Lowering(_pool("max_pool2d")),
    "avg_pool1d": Lowering(_pool("avg_pool1d")),
    "avg_pool2d": Lowering(_pool("avg_pool2d")),
    "adaptive_avg_pool2d": Lowering(lambda c, xs: call(f"F.adaptive_avg_pool2d({xs[0].text}, {_size(c.a('size'))})")),
    "upsample": Lowering(_upsample),
    # comparisons and masks
    "eq": Lowering(_compare("==")),
    "ne": Lowering(_compare("!=")),
    "lt": Lowering(_compare("<")),
    "le": Lowering(_compare("<=")),
    "gt": Lowering(_compare(">")),
    "ge": Lowering(_compare(">=")),
    "logical_and": Lowering(_binop("&", BITAND)),
    "logical_or": Lowering(_binop("|", BITOR)),
    "logical_not": Lowering(lambda c, xs: Expr(f"~{xs[0].at(UNARY)}", UNARY)),
    "where": Lowering(_where),
    "maximum": Lowering(_extremum("maximum")),
    "minimum": Lowering(_extremum("minimum")),
    "clamp": Lowering(_clamp),
    "masked_fill": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.masked_fill({xs[1].text}, {num(c.a('value'))})")),
    "tril": Lowering(_triangle("tril")),
    "triu": Lowering(_triangle("triu")),
    "ones": Lowering(_filled("ones")),
    "zeros": Lowering(_filled("zeros")),
    "parameter": Lowering(lambda c, xs: call(f"{c.module}.weight"),
                          lambda c, ins: f"Parameters(weight={tuple(c.a('shape'))!r})", ("Parameters",)),
    # position embeddings
    "rotary": Lowering(_rotary, helpers=("apply_rotary",)),
}

#: Registered ops this backend does not lower (none yet).
UNSUPPORTED: frozenset[str] = frozenset()

# ---------------------------------------------------------------------------------------------
# custom operators (specc.custom_op)
# ---------------------------------------------------------------------------------------------

#: Generated code imports the module of a custom operator under this prefix (spec values that
#: start with it are renamed by codegen, so they never shadow the module).
EXT_PREFIX = "_ext_"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def module_alias(module: str) -> str:
    """The name generated code imports `module` as: _ext_my_ops, _ext_lab__ops for lab.ops."""
    if not _DOTTED.fullmatch(module) or "__" in module:
        raise ValueError(f"'{module}' is not a module name a custom operator can come from")
    return EXT_PREFIX + module.replace(".", "__")


def _attr_text(c: Ctx, v: Any) -> str:
    if isinstance(v, Sym):
        return c.dim(v)
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_attr_text(c, x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return lit(v)


def custom_lowering(module: str, function: str, args: tuple) -> Lowering:
    """How a custom operator reads in generated code: `alias.function(tensors..., attr=..., param=...)`.

    `args` are the operator's `Arg`s: tensor arguments are passed positionally in order (a list for
    'tensors', None for an absent 'tensor?'), attributes by keyword, and the operator's parameters
    by keyword as `self.<layer>.<name>` (held by a `Parameters` module)."""
    alias = module_alias(module)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", function) or keyword.iskeyword(function):
        raise ValueError(f"'{function}' is not a function name")

    def expr(c: Ctx, xs: list[Expr]) -> Expr:
        parts: list[str] = []
        i = 0
        for a in args:
            if a.kind == "tensors":
                n = c.a(f"{a.name}#")
                parts.append("[" + ", ".join(x.text for x in xs[i:i + n]) + "]")
                i += n
            elif a.kind == "tensor?":
                present = c.a(f"{a.name}?")
                parts.append(xs[i].text if present else "None")
                i += 1 if present else 0
            elif a.kind == "tensor":
                parts.append(xs[i].text)
                i += 1
            else:
                parts.append(f"{a.name}={_attr_text(c, c.a(a.name))}")
        parts += [f"{p.name}={c.module}.{p.name}" for p in c.node.params]
        shapes = [[c.dim(d) for d in t.shape] for t in c.node.outputs]
        declared = ", ".join(f"(({', '.join(d)}{',' if len(d) == 1 else ''}), {DTYPES[t.dtype]!r})"
                             for d, t in zip(shapes, c.node.outputs))
        return call(f"custom_result({lit(c.node.op)}, {alias}.{function}({', '.join(parts)}), {declared})")

    def init(c: Ctx, ins: InTypes) -> str:
        shapes = ", ".join(f"{p.name}={lit(tuple(p.shape))}" for p in c.node.params)
        return f"Parameters({shapes})"

    return Lowering(expr, init, ("Parameters", "custom_result"), (module,))


HELPERS: dict[str, str] = {
    "custom_result": '''
def custom_result(op: str, result, *declared: tuple[tuple[int, ...], str]):
    """`result` of the custom operator `op`, unless its outputs differ from what the operator's shape
    rule declared (RuntimeError naming the output): their number, shapes and dtypes (a declared float:
    any float dtype, the model's after .double() or .half()). Skipped while torch.compile traces."""
    if torch.compiler.is_compiling():
        return result
    outs = result if isinstance(result, (tuple, list)) and len(declared) > 1 else (result,)
    if len(outs) != len(declared):
        raise RuntimeError(f"custom operator {op}: returned {len(outs)} values, its shape rule declares "
                           f"{len(declared)}")
    for i, (y, (shape, dtype)) in enumerate(zip(outs, declared)):
        what = f"custom operator {op}: output {i}" if len(declared) > 1 else f"custom operator {op}"
        if not isinstance(y, torch.Tensor):
            raise RuntimeError(f"{what} is a {type(y).__name__}, not a tensor")
        want = getattr(torch, dtype)
        if tuple(y.shape) != shape:
            raise RuntimeError(f"{what} has shape {list(y.shape)}, its shape rule declares {list(shape)}")
        if y.dtype != want and not (want.is_floating_point and y.dtype.is_floating_point):
            raise RuntimeError(f"{what} has dtype {y.dtype}, its shape rule declares {want}")
    return result
''',
    "Parameters": '''
class Parameters(nn.Module):
    """Parameters by name and shape, of a custom operator or a parameter(...) tensor (values come from the weights)."""

    def __init__(self, **shapes: tuple[int, ...]):
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
''',
    "MultiHeadAttention": '''
class MultiHeadAttention(nn.Module):
    """Multi-head softmax attention; queries from x, keys and values from kv (default x).

    fused_qkv: one projection computes q, k and v of self-attention; sdpa: use the fused
    scaled_dot_product_attention kernel instead of the explicit softmax(q k^T / sqrt(d)) v.
    head_dim: the width of each head (default dim / heads); q, k and v have heads * head_dim columns.
    rope: rotary position embeddings of this base on q and k (positions 0..T-1; apply_rotary's "rotate
    half" layout) over the first rope_dim channels of each head (default all); prefix rows stay unrotated.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False, kv_dim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, fused_qkv: bool = False, sdpa: bool = False,
                 head_dim: int | None = None, rope: float | None = None, rope_dim: int | None = None):
        super().__init__()
        assert head_dim is not None or dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        kv_dim = dim if kv_dim is None else kv_dim
        inner = dim if head_dim is None else heads * head_dim
        self.heads, self.causal, self.dropout, self.fused_qkv, self.sdpa = heads, causal, dropout, fused_qkv, sdpa
        self.inner = inner
        self.rope, self.rope_dim = rope, (inner // heads if rope_dim is None else rope_dim)
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        else:
            self.q = nn.Linear(dim, inner, bias=bias)
            self.k = nn.Linear(kv_dim, inner, bias=bias)
            self.v = nn.Linear(kv_dim, inner, bias=bias)
        self.o = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv is None else kv
        if self.fused_qkv:
            q, k, v = self.qkv(x).split(self.inner, dim=-1)
        else:
            q, k, v = self.q(x), self.k(kv), self.v(kv)
        if self.rope is not None:
            q, k = self.rotate(q), self.rotate(k)
        y = self.attend(q, k, v, self.heads, causal=self.causal, mask=mask, prefix=prefix,
                        dropout=self.dropout if self.training else 0.0, sdpa=self.sdpa)
        return self.o(y)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of the first rope_dim channels of each head of x (..., T, heads * head_dim)."""
        *batch, t, _ = x.shape
        x = x.reshape(*batch, t, self.heads, -1).transpose(-3, -2)  # (..., h, T, hs)
        r = self.rope_dim
        x = torch.cat([apply_rotary(x[..., :r], base=self.rope), x[..., r:]], dim=-1)
        return x.transpose(-3, -2).reshape(*batch, t, -1)  # (..., T, h * hs)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False,
               mask: torch.Tensor | None = None, prefix: torch.Tensor | None = None, dropout: float = 0.0,
               sdpa: bool = False) -> torch.Tensor:
        """softmax(q k^T / sqrt(d/h)) v per head, for projected queries q (..., T, d) and keys and values
        k, v (..., S, d) whose batch dimensions broadcast to q's.

        mask: bool (true = may attend) or float (added to the scores), broadcastable to (..., T, S) or,
        per head, to (..., h, T, S); a query whose keys are all hidden gets zeros. prefix (..., 2, l, d): l key rows and l value rows put before k and
        v (prefix tuning), seen by every query; causal and mask apply to the S positions only.
        """
        *batch, t, d = q.shape
        s, h, dh = k.shape[-2], heads, d // heads
        l = 0 if prefix is None else prefix.shape[-2]
        if prefix is not None:
            k = torch.cat([prefix[..., 0, :, :].expand(*batch, l, d), k.expand(*batch, s, d)], dim=-2)
            v = torch.cat([prefix[..., 1, :, :].expand(*batch, l, d), v.expand(*batch, s, d)], dim=-2)
        q = q.reshape(*batch, t, h, dh).transpose(-3, -2)  # (..., h, T, d/h)
        k = k.reshape(*k.shape[:-1], h, dh).transpose(-3, -2)  # (..., h, l + S, d/h)
        v = v.reshape(*v.shape[:-1], h, dh).transpose(-3, -2)  # (..., h, l + S, d/h)
        if mask is not None and 3 <= mask.dim() < q.dim():
            mask = mask.unsqueeze(-3)  # (..., 1, T, S): the same mask for every head
        if mask is not None and l:  # the prefix columns are always visible
            mask = F.pad(mask.expand(*mask.shape[:-1], s), (l, 0), value=True if mask.dtype == torch.bool else 0.0)
        keep = None
        if causal:
            keep = F.pad(torch.ones(t, s, dtype=torch.bool, device=q.device).tril(), (l, 0), value=True)  # (T, l + S)
        if sdpa:
            if keep is not None and (mask is not None or l):  # the kernel takes a mask or is_causal, not both
                if mask is None or mask.dtype == torch.bool:
                    mask = keep if mask is None else mask & keep
                else:
                    mask = mask.masked_fill(~keep, float("-inf"))
                causal = False
            k, v = k.expand(*batch, *k.shape[-3:]), v.expand(*batch, *v.shape[-3:])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))  # (..., h, T, l + S)
            if keep is not None:
                att = att.masked_fill(~keep, float("-inf"))
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else att + mask
                # a query that sees no key gets zeros, as scaled_dot_product_attention gives (its row is
                # made finite first, so that neither the output nor the gradients become NaN)
                blind = att.amax(-1, keepdim=True) == float("-inf")
                att = F.softmax(att.masked_fill(blind, 0.0), dim=-1).masked_fill(blind, 0.0)
            else:
                att = F.softmax(att, dim=-1)
            if dropout:
                att = F.dropout(att, p=dropout)
            y = att @ v  # (..., h, T, d/h)
        return y.transpose(-3, -2).reshape(*batch, t, d)  # (..., T, d)
''',
    "MultiHeadAttentionGQA": '''
class MultiHeadAttentionGQA(MultiHeadAttention):
    """Grouped-query attention: k and v project to kv_heads * head_dim columns, and each group of
    heads // kv_heads consecutive query heads reads one key/value head (kv_heads=1: multi-query attention).
    The key/value heads are repeated (repeat_interleave) before MultiHeadAttention.attend; a prefix
    (..., 2, l, kv_heads * head_dim) too. Rotary embeddings turn k on its kv_heads heads. The static
    attend(..., kv_heads=) does the same for keys and values the spec projects itself (the attend op)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, causal: bool = False, kv_dim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, fused_qkv: bool = False, sdpa: bool = False,
                 head_dim: int | None = None, rope: float | None = None, rope_dim: int | None = None):
        nn.Module.__init__(self)
        assert head_dim is not None or dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        assert heads % kv_heads == 0, f"kv_heads={kv_heads} does not divide heads={heads}"
        kv_dim = dim if kv_dim is None else kv_dim
        inner = dim if head_dim is None else heads * head_dim
        self.heads, self.causal, self.dropout, self.fused_qkv, self.sdpa = heads, causal, dropout, fused_qkv, sdpa
        self.kv_heads, self.inner, self.kv_inner = kv_heads, inner, inner // heads * kv_heads
        self.rope, self.rope_dim = rope, (inner // heads if rope_dim is None else rope_dim)
        if fused_qkv:
            self.qkv = nn.Linear(dim, inner + 2 * self.kv_inner, bias=bias)
        else:
            self.q = nn.Linear(dim, inner, bias=bias)
            self.k = nn.Linear(kv_dim, self.kv_inner, bias=bias)
            self.v = nn.Linear(kv_dim, self.kv_inner, bias=bias)
        self.o = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv is None else kv
        if self.fused_qkv:
            q, k, v = self.qkv(x).split([self.inner, self.kv_inner, self.kv_inner], dim=-1)
        else:
            q, k, v = self.q(x), self.k(kv), self.v(kv)
        if self.rope is not None:
            q, k = self.rotate(q), self.rotate(k)
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        prefix = None if prefix is None else self.repeat_kv(prefix)
        y = self.attend(q, k, v, self.heads, causal=self.causal, mask=mask, prefix=prefix,
                        dropout=self.dropout if self.training else 0.0, sdpa=self.sdpa)
        return self.o(y)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of the first rope_dim channels of each head of x (..., T, n * head_dim), n heads."""
        *batch, t, w = x.shape
        hs = self.inner // self.heads
        x = x.reshape(*batch, t, w // hs, hs).transpose(-3, -2)  # (..., n, T, hs)
        r = self.rope_dim
        x = torch.cat([apply_rotary(x[..., :r], base=self.rope), x[..., r:]], dim=-1)
        return x.transpose(-3, -2).reshape(*batch, t, -1)  # (..., T, n * hs)

    def repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """(..., kv_heads * hs) -> (..., heads * hs): key/value head j repeated for query heads
        j * g .. j * g + g - 1 (g = heads // kv_heads)."""
        return self.repeat_heads(x, self.heads, self.kv_heads)

    @staticmethod
    def repeat_heads(x: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
        """(..., kv_heads * hs) -> (..., heads * hs), each head repeated heads // kv_heads times in place."""
        hs = x.shape[-1] // kv_heads
        x = x.reshape(*x.shape[:-1], kv_heads, hs).repeat_interleave(heads // kv_heads, dim=-2)
        return x.reshape(*x.shape[:-2], heads * hs)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False,
               mask: torch.Tensor | None = None, prefix: torch.Tensor | None = None, dropout: float = 0.0,
               sdpa: bool = False, kv_heads: int | None = None) -> torch.Tensor:
        """MultiHeadAttention.attend over keys and values (..., S, kv_heads * hs) of kv_heads heads (and a
        prefix (..., 2, l, kv_heads * hs)), hs = d / heads: query head i reads key/value head
        i // (heads // kv_heads). kv_heads=None: heads (the keys and values as they are)."""
        if kv_heads is not None and kv_heads != heads:
            k = MultiHeadAttentionGQA.repeat_heads(k, heads, kv_heads)
            v = MultiHeadAttentionGQA.repeat_heads(v, heads, kv_heads)
            prefix = None if prefix is None else MultiHeadAttentionGQA.repeat_heads(prefix, heads, kv_heads)
        return MultiHeadAttention.attend(q, k, v, heads, causal=causal, mask=mask, prefix=prefix, dropout=dropout,
                                         sdpa=sdpa)
''',
    "apply_rotary": '''
def apply_rotary(x: torch.Tensor, positions: torch.Tensor | None = None, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding over the last dimension of x (..., T, d), GPT-NeoX / LLaMA "rotate half"
    layout: channel i pairs with channel i + d/2 and turns by positions * base ** (-2i / d).

    positions: integers (T,) or, per batch row, (B, T); default arange(T). Angles in float32 or wider.
    """
    t, d = x.shape[-2], x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    if positions is None:
        positions = torch.arange(t, device=x.device)
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=dtype) / d))  # (d/2,)
    angles = positions.to(dtype)[..., None] * inv_freq  # (T, d/2) or (B, T, d/2)
    if angles.dim() == 3:
        angles = angles.reshape(angles.shape[0], *[1] * (x.dim() - 3), t, d // 2)  # (B, 1.., T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, d)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * angles.cos().to(x.dtype) + torch.cat([-x2, x1], dim=-1) * angles.sin().to(x.dtype)
''',
    "MLP": '''
class MLP(nn.Module):
    """linear -> activation -> dropout -> linear."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, act: str = "gelu", bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out or dim, bias=bias)
        self.act, self.dropout = act, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = ACTIVATIONS[self.act](h)
        if self.dropout:
            h = F.dropout(h, p=self.dropout, training=self.training)
        return self.fc2(h)


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
               "softplus": F.softplus, "leaky_relu": F.leaky_relu, "elu": F.elu, "hardswish": F.hardswish,
               "mish": F.mish, "identity": lambda x: x}
''',
}


def dim_text(d: Any, name: Callable[[str], str] = str) -> str:
    """Python source for a dimension; symbols are local variables of the forward method, spelt `name(s)`."""
    if not isinstance(d, Sym):
        return str(d)
    parts = []
    for monomial, coef in sorted(d.terms, key=lambda t: (-len(t[0]), t[0])):
        factors = ([str(abs(coef))] if abs(coef) != 1 or not monomial else []) + [name(s) for s in monomial]
        parts.append(("- " if coef < 0 else "+ ") + " * ".join(factors))
    text = " ".join(parts)
    text = text[2:] if text.startswith("+ ") else "-" + text[2:]
    return text if len(d.terms) == 1 else f"({text})"


from . import lowering_gradient  # noqa: E402  (grad_reverse)
LOWERINGS.update(lowering_gradient.LOWERINGS)
HELPERS.update(lowering_gradient.HELPERS)


from . import lowering_attention  # noqa: E402  (attend)
LOWERINGS.update(lowering_attention.LOWERINGS)

from . import lowering_image, lowering_moe, lowering_select  # noqa: E402  (rot90; moe_mlp; amax/argmax/gather/unsqueeze)
LOWERINGS.update({**lowering_image.LOWERINGS, **lowering_moe.LOWERINGS, **lowering_select.LOWERINGS})
HELPERS.update(lowering_moe.HELPERS)

from . import lowering_memory  # noqa: E402  (omega_memory: the Omega rule as a helper function)
LOWERINGS.update(lowering_memory.LOWERINGS); HELPERS.update(lowering_memory.HELPERS)
from . import lowering_detach  # noqa: E402  (detach)
LOWERINGS.update(lowering_detach.LOWERINGS)

from . import lowering_flow  # noqa: E402  (warp, splat, correlation)
LOWERINGS.update(lowering_flow.LOWERINGS)
HELPERS.update(lowering_flow.HELPERS)
