"""A Hypothesis strategy for random valid specs: shape-consistent graphs over the op registry.

Each generated spec has one input x: f32[B, T, d] and a graph body of a few statements drawn from
a menu of op patterns; every pattern knows the shape of what it makes, so the spec always checks.
Patterns include the shapes the optimiser rewrites (linear chains, neutral arithmetic, cancelling
transposes, repeated subexpressions, dropout, attention), so differential tests reach the passes; one
regroups the last axis by residue with strided slices (x[:, :, r::s]).
Values stay bounded (normalisation and squashing keep inputs of later ops away from overflow), so
float comparisons are meaningful. A failing example shrinks to a short spec, printed as text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from specc.compiler.ops import ACTIVATIONS

WIDTHS = (4, 8, 12, 16)
#: mlp's and moe_mlp's act=, every one the compiler accepts.
MLP_ACTS = ACTIVATIONS


@dataclass
class Builder:
    d: int
    lines: list[str] = field(default_factory=list)
    values: list[tuple[str, int]] = field(default_factory=list)  # name, last dim ([B, T, last])
    square: list[str] = field(default_factory=list)  # values of shape [B, T, T]

    def new(self, expr: str, width: int | None, square: bool = False) -> str:
        name = f"v{len(self.lines)}"
        self.lines.append(f"{name} = {expr}")
        if square:
            self.square.append(name)
        else:
            self.values.append((name, width))
        return name

    def spec(self, outputs: list[str]) -> str:
        body = "\n".join("  " + ln for ln in self.lines)
        outs = "\n".join(f"  {o}:" for o in outputs)
        return (f"specc: 1\nname: generated\ndims:\n  B: 2\n  T: 5\ninputs:\n  x: f32[B, T, {self.d}]\n"
                f"graph: |\n{body}\noutputs:\n{outs}\n")


@st.composite
def pattern(draw, b: Builder) -> None:
    name, width = draw(st.sampled_from(b.values))
    kind = draw(st.sampled_from([
        "act", "linear", "linear_chain", "norm", "neutral", "scale", "dropout", "transpose_pair",
        "reshape_pair", "attention", "mlp", "binary", "concat_split", "mean", "matmul", "cse", "softmax",
        "lora", "periodic", "extremum", "strided", "cumsum",
    ]))
    w = draw(st.sampled_from(WIDTHS))
    if kind == "act":  # continuous ones (floor, round, sign jump: a rounding difference could flip them)
        act = draw(st.sampled_from(["relu", "gelu", "silu", "tanh", "sigmoid", "sin", "cos", "erf", "softplus",
                                    "leaky_relu", "elu", "hardswish", "mish"]))
        b.new(f"{act}({name})", width)
    elif kind == "linear":
        bias = draw(st.booleans())
        b.new(f"linear({name}, {w}{'' if bias else ', bias=false'})", w)
    elif kind == "linear_chain":
        h = draw(st.sampled_from(WIDTHS))
        b1, b2 = draw(st.booleans()), draw(st.booleans())
        b.new(f"linear(linear({name}, {h}{'' if b1 else ', bias=false'}), {w}{'' if b2 else ', bias=false'})", w)
    elif kind == "norm":
        op = draw(st.sampled_from(["layer_norm", "rms_norm"]))
        b.new(f"{op}({name})", width)
    elif kind == "neutral":
        expr = draw(st.sampled_from(["{v} * 1", "{v} + 0", "1 * {v}", "{v} / 1", "0 + {v}", "{v} - 0"]))
        b.new(expr.format(v=name), width)
    elif kind == "scale":
        a, c = draw(st.sampled_from([0.5, 2, 3, 0.25])), draw(st.sampled_from([0.5, 1.5, 2]))
        b.new(f"{name} * ({a} * {c})", width)
    elif kind == "dropout":
        p = draw(st.sampled_from([0.0, 0.1, 0.5]))
        b.new(f"dropout({name}, p={p})", width)
    elif kind == "transpose_pair":
        b.new(f"transpose(tanh(transpose({name}, 1, 2)), 2, 1)", width)
    elif kind == "reshape_pair" and width % 2 == 0:
        b.new(f"reshape(reshape({name}, B, T, 2, {width // 2}), B, T, {width})", width)
    elif kind == "attention":
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if width % h == 0]))
        causal = draw(st.booleans())
        b.new(f"attention(layer_norm({name}), heads={heads}, causal={str(causal).lower()})", width)
    elif kind == "mlp":
        act = draw(st.sampled_from(MLP_ACTS))
        b.new(f"mlp({name}, hidden={w}, act={act})", width)
    elif kind == "binary":
        same = [n for n, k in b.values if k == width]
        other = draw(st.sampled_from(same))
        op = draw(st.sampled_from(["+", "-", "*"]))
        b.new(f"tanh({name} {op} {other})", width)
    elif kind == "concat_split" and width % 2 == 0:
        b.lines.append(f"a{len(b.lines)}, c{len(b.lines)} = split({name}, 2)")
        i = len(b.lines) - 1
        b.new(f"concat([c{i}, a{i}], dim=-1)", width)
    elif kind == "mean":
        b.new(f"{name} - mean({name}, dim=-1, keepdim=true)", width)
    elif kind == "matmul":
        b.new(f"softmax({name} @ transpose({name}, 1, 2))", None, square=True)
    elif kind == "cse":
        b.new(f"sigmoid({name}) + sigmoid({name})", width)
    elif kind == "softmax":
        b.new(f"softmax({name})", width)
    elif kind == "lora":
        r = draw(st.sampled_from([1, 2]))
        b.new(f"linear({name}, {w}) + 0.5 * linear(linear({name}, {r}, bias=false), {w}, bias=false)", w)
    elif kind == "periodic":
        # % and // by a nonzero constant, in r * (c - r) with r the remainder: continuous where r jumps
        # from c to 0, so that a rounding difference between builds cannot flip the result
        c = draw(st.sampled_from([0.5, 0.75, 2]))
        r = draw(st.sampled_from(["{v} % {c}", "({v} - {c} * ({v} // {c}))"])).format(v=name, c=c)
        b.new(f"{r} * ({c} - {r})", width)
    elif kind == "extremum":  # continuous: a rounding difference moves the result as little
        other = draw(st.sampled_from([n for n, k in b.values if k == width]))
        expr = draw(st.sampled_from(["maximum({v}, {o})", "minimum({o}, {v})", "maximum({v}, 0.0)",
                                     "clamp({v}, min=-0.5, max=0.75)", "clamp({v}, max=0.25)"]))
        b.new(expr.format(v=name, o=other), width)
    elif kind == "cumsum":  # running sums along T (forward or from the end), scaled by a constant
        reverse = draw(st.booleans())
        b.new(f"cumsum({name}, dim=1{', reverse=true' if reverse else ''}) * 0.25", width)
    elif kind == "strided":
        # the last axis regrouped by residue mod s (x[:, :, r::s] for r = s-1, ..., 0): strided slices
        # whose concat is a permutation of the columns, so the width stays
        s = draw(st.sampled_from([s for s in (2, 3, 4) if width % s == 0]))
        parts = ", ".join(f"{name}[:, :, {r}::{s}]" if r else f"{name}[:, :, ::{s}]" for r in reversed(range(s)))
        b.new(f"concat([{parts}], dim=-1)", width)
    else:  # a pattern that did not fit this width
        b.new(f"tanh({name})", width)


@st.composite
def specs(draw, min_ops: int = 1, max_ops: int = 8) -> str:
    """Text of a random valid spec."""
    d = draw(st.sampled_from(WIDTHS))
    b = Builder(d, values=[("x", d)])
    for _ in range(draw(st.integers(min_ops, max_ops))):
        draw(pattern(b))
    last = [n for n, _ in b.values[-1:]]
    outputs = list(dict.fromkeys(last + b.square[-1:] + ([b.values[-2][0]] if len(b.values) > 2 else [])))
    outputs = [o for o in outputs if o != "x"] or [b.new("tanh(x)", d)]
    return b.spec(outputs)


@st.composite
def specs_with(draw, kinds: list[str], width: int | None = None) -> str:
    """A random spec that surely contains one of the given rewrite targets (for per-pass tests)."""
    d = width or draw(st.sampled_from(WIDTHS))
    b = Builder(d, values=[("x", d)])
    for _ in range(draw(st.integers(0, 3))):
        draw(pattern(b))
    name, w = b.values[-1]
    target = draw(st.sampled_from(kinds))  # a template whose result has the input's width {w}
    b.new(target.format(v=name, w=w, h=draw(st.sampled_from(WIDTHS))), w)
    for _ in range(draw(st.integers(0, 2))):
        draw(pattern(b))
    return b.spec([b.values[-1][0]])


@st.composite
def image_specs(draw, max_ops: int = 6) -> str:
    """Random valid convolutional specs on x: f32[B, C, 8, 8] (conv, batch norm, RepConv-style
    parallel branches, pools, upsampling, channel concat), reaching the convolution passes."""
    c = draw(st.sampled_from([2, 4]))
    lines: list[str] = []
    values: list[tuple[str, int, int]] = [("x", c, 8)]  # name, channels, spatial size
    for i in range(draw(st.integers(1, max_ops))):
        name, ch, hw = draw(st.sampled_from(values))
        out = draw(st.sampled_from([2, 4, 6]))
        kind = draw(st.sampled_from(["conv_bn", "repconv", "identity_branch", "pool", "upsample", "concat",
                                     "act", "depthwise"]))
        v = f"i{i}"
        if kind == "conv_bn":
            k = draw(st.sampled_from([1, 3]))
            expr = f"silu(batch_norm(conv2d({name}, {out}, {k}, padding={k // 2}, bias=false)))"
            values.append((v, out, hw))
        elif kind == "repconv":
            expr = (f"relu(batch_norm(conv2d({name}, {out}, 3, padding=1, bias=false)) + "
                    f"batch_norm(conv2d({name}, {out}, 1, bias=false)))")
            values.append((v, out, hw))
        elif kind == "identity_branch":
            expr = f"relu(conv2d({name}, {ch}, 3, padding=1) + conv2d({name}, {ch}, 1) + {name})"
            values.append((v, ch, hw))
        elif kind == "pool" and hw % 2 == 0 and hw > 2:
            op = draw(st.sampled_from(["max_pool2d", "avg_pool2d"]))
            expr = f"{op}({name}, 2)"
            values.append((v, ch, hw // 2))
        elif kind == "upsample" and hw <= 8:
            expr = f"upsample({name}, scale=2)"
            values.append((v, ch, hw * 2))
        elif kind == "concat":
            same = [n for n, cc, h in values if h == hw]
            other = draw(st.sampled_from(same))
            och = next(cc for n, cc, h in values if n == other)
            expr = f"concat([{name}, {other}], dim=1)"
            values.append((v, ch + och, hw))
        elif kind == "depthwise":
            expr = f"batch_norm(conv2d({name}, {ch}, 3, padding=1, groups={ch}))"
            values.append((v, ch, hw))
        else:
            expr = f"tanh({name})"
            values.append((v, ch, hw))
        lines.append(f"{v} = {expr}")
    body = "\n".join("  " + ln for ln in lines)
    last = values[-1][0]
    if last == "x":
        body, last = "  y = tanh(x)", "y"
    return (f"specc: 1\nname: generated\ndims:\n  B: 2\ninputs:\n  x: f32[B, {c}, 8, 8]\ngraph: |\n{body}\n"
            f"outputs:\n  {last}:\n")


@st.composite
def masked_specs(draw, min_ops: int = 1, max_ops: int = 6) -> str:
    """Random valid specs that mix `pattern`s with the mask and position ops: comparisons, logical ops,
    where, masked_fill, tril/triu, ones/zeros, rotary (default and given positions), attention with
    bool and float masks (the diagonal always allowed, so no query row is empty), amax/amin, argmax and
    gather, rot90, moe_mlp and attend (kv_heads= too: grouped-query). Every comparison and argmax reads
    the input x itself (x[:, :, i:i+1] or x[:, :, i], broadcast over any width), never a
    computed value: a float32 and a float64 run then take the same branch."""
    d = draw(st.sampled_from(WIDTHS))
    b = Builder(d, values=[("x", d)])
    for _ in range(draw(st.integers(min_ops, max_ops))):
        if draw(st.booleans()):
            draw(pattern(b))
            continue
        name, width = draw(st.sampled_from(b.values))
        i, j = draw(st.integers(0, d - 1)), draw(st.integers(0, d - 1))
        t = draw(st.sampled_from([-0.5, 0.0, 0.3]))
        cmp = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        cond = f"x[:, :, {i}:{i + 1}] {cmp} {t}" if cmp not in ("==", "!=") else \
            f"(x[:, :, {i}:{i + 1}] > {t}) {cmp} (x[:, :, {j}:{j + 1}] > {t})"
        kind = draw(st.sampled_from(["where", "masked_fill", "logic", "rotary", "rotary_positions", "mask_attention",
                                     "float_mask_attention", "triangle", "filled", "extremes", "argmax_gather",
                                     "rot90", "moe", "attend"]))
        if kind == "where":
            b.new(f"where({cond}, {name}, tanh({name}) * 0.5)", width)
        elif kind == "masked_fill":
            b.new(f"masked_fill({name}, {cond}, {draw(st.sampled_from([0.0, -1.5, 2.0]))})", width)
        elif kind == "logic":
            other = f"x[:, :, {j}:{j + 1}] > {t}"
            op = draw(st.sampled_from(["logical_and", "logical_or"]))
            b.new(f"{name} * cast({op}({cond}, logical_not({other})), f32)", width)
        elif kind == "rotary":
            b.new(f"rotary({name})", width)
        elif kind == "rotary_positions":
            b.new(f"rotary({name}, positions=arange(T), base=100.0)", width)
        elif kind in ("mask_attention", "float_mask_attention"):
            heads = draw(st.sampled_from([h for h in (1, 2, 4) if width % h == 0]))
            causal = str(draw(st.booleans())).lower()
            if kind == "mask_attention":
                mask = f"logical_or(reshape(x[:, :, {i}] > {t}, B, 1, T), tril(triu(ones(T, T, dtype=bool))))"
            else:
                mask = f"x[:, :, {i}:{i + 1}] * 0.5 + zeros(T, T)"
            b.new(f"attention(layer_norm({name}), heads={heads}, causal={causal}, mask={mask})", width)
        elif kind == "triangle":
            op = draw(st.sampled_from(["tril", "triu"]))
            k = draw(st.sampled_from([-1, 0, 1]))
            b.new(f"{op}(softmax({name} @ transpose({name}, 1, 2)), diagonal={k})", None, square=True)
        elif kind == "extremes":
            b.new(f"{name} - amax({name}, dim=-1, keepdim=true) + amin({name}, dim=[1, 2], keepdim=true)", width)
        elif kind == "argmax_gather":  # positions picked on the input x (ties cannot differ between runs)
            idx = f"unsqueeze(argmax(x[:, :, 0:{min(d, width)}]), -1)"
            b.new(f"{name} + gather({name}, {idx}) * 0.5", width)
        elif kind == "rot90":
            b.new(f"transpose(rot90({name}, dims=[1, 2]), 1, 2) * 0.5 + rot90({name}, k=2, dims=[1, 2])", width)
        elif kind == "moe":
            experts = min(d, 3)
            route = f"argmax(x[:, :, 0:{experts}])"
            b.new(f"moe_mlp({name}, {route}, experts={experts}, hidden={draw(st.sampled_from(WIDTHS))}, "
                  f"act={draw(st.sampled_from(MLP_ACTS))})", width)
        elif kind == "attend":
            heads = draw(st.sampled_from([h for h in (1, 2, 4) if width % h == 0]))
            causal = str(draw(st.booleans())).lower()
            kv_heads = draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0]))
            if kv_heads == heads:
                b.new(f"attend(linear({name}, {width}), linear({name}, {width}, bias=false), {name}, heads={heads}, "
                      f"causal={causal})", width)
            else:  # grouped-query: keys and values of kv_heads heads of the queries' head width
                kw = width // heads * kv_heads
                b.new(f"attend(linear({name}, {width}), linear({name}, {kw}, bias=false), linear({name}, {kw}), "
                      f"heads={heads}, kv_heads={kv_heads}, causal={causal})", width)
        else:
            b.new(f"{name} + ones(B, T, {width}) * 0.5 - zeros({width})", width)
    last = [n for n, _ in b.values[-1:]]
    outputs = list(dict.fromkeys(last + b.square[-1:]))
    outputs = [o for o in outputs if o != "x"] or [b.new("tanh(x)", d)]
    return b.spec(outputs)
