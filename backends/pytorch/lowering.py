"""PyTorch lowerings, keyed by op name: how each IR op reads in generated source.

A lowering gives the Python expression of a node from its inputs' expressions, and for ops with
parameters the constructor of the submodule that holds them. Ops this backend cannot lower are
listed in UNSUPPORTED (a test checks that every registered op is in one table or the other).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from specc.compiler.dims import Sym
from specc.compiler.ir import DTYPES, Node

# Python operator precedences, for parenthesising inlined expressions.
ATOM, POW, UNARY, MUL, ADD = 100, 7, 6, 5, 4


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
        right_prec = prec + 1 if symbol != "**" else prec
        left_prec = prec if symbol != "**" else prec + 1
        return Expr(f"{xs[0].at(left_prec)} {symbol} {xs[1].at(right_prec)}", prec)

    return lower


def _scalar(c: Ctx, xs: list[Expr]) -> Expr:
    v = c.a("value")
    text = repr(float(v)) if c.a("dtype") in ("f16", "bf16", "f32", "f64") else str(int(v))
    return Expr(text, ATOM if not text.startswith("-") else UNARY)


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


def _getitem(c: Ctx, xs: list[Expr]) -> Expr:
    parts = []
    for it in c.a("index"):
        if it[0] == "int":
            parts.append(str(it[1]))
        else:
            s = "" if it[1] is None else c.dim(it[1])
            e = "" if it[2] is None else c.dim(it[2])
            parts.append(f"{s}:{e}")
    return call(f"{xs[0].at(ATOM)}[{', '.join(parts)}]")


def _arange(c: Ctx, xs: list[Expr]) -> Expr:
    return call(f"torch.arange({c.dim(c.a('n'))}, dtype=torch.{DTYPES[c.a('dtype')]}, device={c.device})")


def _layer_norm_init(c: Ctx, ins: InTypes) -> str:
    d = ins[0].shape[-1]
    return (f"nn.LayerNorm({d}, eps={lit(c.a('eps'))}"
            + (", bias=False" if not c.a("bias") else "") + ")")


def _layer_norm(c: Ctx, xs: list[Expr]) -> Expr:
    if c.a("affine"):
        return call(f"{c.module}({xs[0].text})")
    d = c.node.outputs[0].shape[-1]
    return call(f"F.layer_norm({xs[0].text}, ({c.dim(d)},), eps={lit(c.a('eps'))})")


def _rms_norm(c: Ctx, xs: list[Expr]) -> Expr:
    if c.a("affine"):
        return call(f"{c.module}({xs[0].text})")
    d = c.node.outputs[0].shape[-1]
    return call(f"F.rms_norm({xs[0].text}, ({c.dim(d)},), eps={lit(c.a('eps'))})")


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


def _lstm_init(c: Ctx, ins: InTypes) -> str:
    args = [str(ins[0].shape[-1]), str(c.a("hidden"))]
    if c.a("layers") != 1:
        args.append(f"num_layers={c.a('layers')}")
    args.append("batch_first=True")
    if c.a("bidirectional"):
        args.append("bidirectional=True")
    return f"nn.LSTM({', '.join(args)})"


def _module_call(c: Ctx, xs: list[Expr]) -> Expr:
    return call(f"{c.module}({', '.join(x.text for x in xs)})")


LOWERINGS: dict[str, Lowering] = {
    "input": Lowering(lambda c, xs: call(c.a("name"))),
    "scalar": Lowering(_scalar),
    "arange": Lowering(_arange),
    "cast": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.to(torch.{DTYPES[c.a('dtype')]})")),
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
    "add": Lowering(_binop("+", ADD)),
    "sub": Lowering(_binop("-", ADD)),
    "mul": Lowering(_binop("*", MUL)),
    "div": Lowering(_binop("/", MUL)),
    "pow": Lowering(_binop("**", POW)),
    "matmul": Lowering(_binop("@", MUL)),
    "linear": Lowering(_module_call, lambda c, ins: f"nn.Linear({ins[0].shape[-1]}, {c.a('out')}"
                                                      + (", bias=False)" if not c.a("bias") else ")")),
    "embedding": Lowering(_module_call, lambda c, ins: f"nn.Embedding({c.a('num')}, {c.a('dim')})"),
    "layer_norm": Lowering(_layer_norm, lambda c, ins: _layer_norm_init(c, ins) if c.a("affine") else ""),
    "rms_norm": Lowering(_rms_norm, lambda c, ins: f"nn.RMSNorm({ins[0].shape[-1]}, eps={lit(c.a('eps'))})"
                         if c.a("affine") else ""),
    "dropout": Lowering(lambda c, xs: call(f"F.dropout({xs[0].text}, p={lit(c.a('p'))}, training=self.training)")),
    "attention": Lowering(_module_call, _attention_init, ("MultiHeadAttention",)),
    "mlp": Lowering(_module_call, _mlp_init, ("MLP",)),
    "lstm": Lowering(lambda c, xs: call(f"{c.module}({xs[0].text})[0]"), _lstm_init),
    "softmax": Lowering(lambda c, xs: call(f"F.softmax({xs[0].text}, dim={c.a('dim')})")),
    "mean": Lowering(_reduce("mean")),
    "sum": Lowering(_reduce("sum")),
    "transpose": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.transpose({c.a('dim0')}, {c.a('dim1')})")),
    "permute": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.permute({', '.join(map(str, c.a('dims')))})")),
    "reshape": Lowering(lambda c, xs: call(f"{xs[0].at(ATOM)}.reshape({', '.join(c.dim(d) for d in c.a('shape'))})")),
    "concat": Lowering(lambda c, xs: call(f"torch.cat([{', '.join(x.text for x in xs)}], dim={c.a('dim')})")),
    "split": Lowering(lambda c, xs: call(
        f"torch.split({xs[0].text}, [{', '.join(c.dim(t.shape[c.a('dim')]) for t in c.node.outputs)}], "
        f"dim={c.a('dim')})")),
    "getitem": Lowering(_getitem),
}

#: Registered ops this backend does not lower (none yet).
UNSUPPORTED: frozenset[str] = frozenset()


HELPERS: dict[str, str] = {
    "MultiHeadAttention": '''
class MultiHeadAttention(nn.Module):
    """Multi-head softmax attention; queries from x, keys and values from kv (default x).

    fused_qkv: one projection computes q, k and v of self-attention; sdpa: use the fused
    scaled_dot_product_attention kernel instead of the explicit softmax(q k^T / sqrt(d)) v.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False, kv_dim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, fused_qkv: bool = False, sdpa: bool = False):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        kv_dim = dim if kv_dim is None else kv_dim
        self.heads, self.causal, self.dropout, self.fused_qkv, self.sdpa = heads, causal, dropout, fused_qkv, sdpa
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        else:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.k = nn.Linear(kv_dim, dim, bias=bias)
            self.v = nn.Linear(kv_dim, dim, bias=bias)
        self.o = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv is None else kv
        *batch, t, d = x.shape
        s = kv.shape[-2]
        h = self.heads
        if self.fused_qkv:
            q, k, v = self.qkv(x).split(d, dim=-1)
        else:
            q, k, v = self.q(x), self.k(kv), self.v(kv)
        q = q.reshape(*batch, t, h, d // h).transpose(-3, -2)  # (..., h, T, d/h)
        k = k.reshape(*batch, s, h, d // h).transpose(-3, -2)  # (..., h, S, d/h)
        v = v.reshape(*batch, s, h, d // h).transpose(-3, -2)  # (..., h, S, d/h)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=self.causal)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h))  # (..., h, T, S)
            if self.causal:
                mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril()
                att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = F.dropout(att, p=self.dropout, training=self.training)
            y = att @ v  # (..., h, T, d/h)
        y = y.transpose(-3, -2).reshape(*batch, t, d)  # (..., T, d)
        return self.o(y)
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
        h = F.dropout(h, p=self.dropout, training=self.training)
        return self.fc2(h)


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
               "identity": lambda x: x}
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
