"""Deterministic weight initialisation from a seed, following each parameter's declared initialiser."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from specc.compiler.ir import DTYPES, Graph, Init


def _fill(t: torch.Tensor, init: Init, gen: torch.Generator) -> torch.Tensor:
    kind, args = init.kind, init.args
    if kind == "uniform":
        return t.uniform_(-args[0], args[0], generator=gen)
    if kind == "normal":
        std, mean = (args + (0.0,))[:2] if len(args) == 1 else args[:2]
        return t.normal_(mean, std, generator=gen)
    if kind == "zeros":
        return t.zero_()
    if kind == "ones":
        return t.fill_(1.0)
    if kind == "constant":
        return t.fill_(args[0])
    if kind == "eye":  # square 2-D weights (checked when the spec is elaborated)
        return t.copy_(torch.eye(t.shape[0], dtype=t.dtype))
    raise ValueError(f"unknown initialiser {init}")


def init_weights(graph: Graph, seed: int | None = None,
                 given: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All parameters of `graph` (tied ones once, at their owner), initialised from `seed`.

    The order is the graph's deterministic node order, so a seed always gives the same tensors.
    `given` tensors (checked by merge_given) replace the seeded ones before the copies of `init_from=`
    are made, so that experts upcycled from a given dense MLP start as copies of its given values.
    """
    gen = torch.Generator().manual_seed(graph.seed if seed is None else seed)
    out: dict[str, torch.Tensor] = {}
    copies = []
    for _, node in graph.nodes():
        for p in node.params:
            if p.tied_to is not None:
                continue
            name = ".".join(node.path + (p.name,))
            if p.init.kind == "copy":  # filled once every other parameter has its value
                copies.append((name, p))
                out[name] = torch.empty(0)
                continue
            t = torch.empty(p.shape, dtype=torch.float32)
            out[name] = _fill(t, p.init, gen).to(getattr(torch, DTYPES[p.dtype]))
    given = given or {}
    out.update(given)
    pending = {name: p for name, p in copies if name not in given}

    def fill(name: str) -> torch.Tensor:
        """init_from=: the source's initial value (itself perhaps a copy, or given), once per leading
        index if it has fewer dimensions."""
        p = pending.pop(name, None)
        if p is not None:
            out[name] = fill(p.init.source).expand(p.shape).to(getattr(torch, DTYPES[p.dtype])).clone()
        return out[name]

    for name, _ in copies:
        fill(name)
    return out


def merge_given(graph: Graph, given: Mapping[str, Any], source: str = "<weights>") -> dict[str, torch.Tensor]:
    """The parameters of `graph` initialised from its seed, with the tensors of `given` in place of
    the parameters they name. Every given name must be a parameter of `graph` (not a tied one) and
    its shape must match; each problem is reported (all at once) as a SpecError located at `source`
    (e.g. the weights file), listing close names for an unknown one. Values are cast to the
    parameter's dtype; a float tensor is not accepted for an integer parameter or buffer.
    """
    import difflib

    from specc.compiler.diagnostics import Diagnostic, Span, SpecError

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    tied: dict[str, str] = {}
    for _, node in graph.nodes():
        for p in node.params:
            name = ".".join(node.path + (p.name,))
            if p.tied_to is not None:
                tied[name] = p.tied_to
            else:
                shapes[name] = (tuple(p.shape), p.dtype)
    where = Span(source, 0, 0)
    problems: list[Diagnostic] = []
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(given):
        value = given[name]
        if name in tied:
            problems.append(Diagnostic(where, f"weights: '{name}' shares the storage of '{tied[name]}'; give "
                                              f"'{tied[name]}' instead"))
            continue
        if name not in shapes:
            close = difflib.get_close_matches(str(name), sorted(shapes), n=3, cutoff=0.5)
            problems.append(Diagnostic(where, f"weights: '{name}' is not a parameter of {graph.name}",
                                       notes=(f"close names: {', '.join(close)}" if close else
                                              f"parameters: {', '.join(sorted(shapes)[:12])}"
                                              + (", ..." if len(shapes) > 12 else ""),)))
            continue
        try:
            t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            problems.append(Diagnostic(where, f"weights: '{name}' is not a tensor ({type(value).__name__}: {e})"))
            continue
        shape, dtype = shapes[name]
        if tuple(t.shape) != shape:
            problems.append(Diagnostic(where, f"weights: '{name}' has shape [{', '.join(map(str, t.shape))}], but "
                                              f"the parameter has shape [{', '.join(map(str, shape))}]"))
            continue
        want = getattr(torch, DTYPES[dtype])
        if t.dtype.is_floating_point and not want.is_floating_point:
            problems.append(Diagnostic(where, f"weights: '{name}' is {str(t.dtype).replace('torch.', '')}, but the "
                                              f"parameter is {dtype}"))
            continue
        tensors[name] = t.detach().to("cpu", want).clone().contiguous()
    if problems:
        raise SpecError(problems)
    return init_weights(graph, given=tensors)


def evaluate(expr: tuple, base: dict[str, torch.Tensor]) -> torch.Tensor:
    """Evaluate a weight expression (compiler/weightexpr.py) over `base`, in float64."""
    op, args = expr[0], expr[1:]
    if op == "param":
        return base[args[0]].to(torch.float64)
    if op == "matmul":
        return evaluate(args[0], base) @ evaluate(args[1], base)
    if op == "add":
        return evaluate(args[0], base) + evaluate(args[1], base)
    if op == "sub":
        return evaluate(args[0], base) - evaluate(args[1], base)
    if op == "mul":
        return evaluate(args[0], base) * evaluate(args[1], base)
    if op == "scale":
        return evaluate(args[0], base) * float(args[1])
    if op == "t":
        return evaluate(args[0], base).t()
    if op == "concat":
        return torch.cat([evaluate(a, base) for a in args[1:]], dim=args[0])
    if op == "reshape":
        return evaluate(args[0], base).reshape(args[1])
    if op == "rows":
        return evaluate(args[0], base)[torch.tensor(args[1], dtype=torch.long)]
    if op == "cols":
        return evaluate(args[0], base)[:, torch.tensor(args[1], dtype=torch.long)]
    if op == "rsqrt_add":
        return torch.rsqrt(evaluate(args[0], base) + float(args[1]))
    if op == "chain":
        return evaluate_chain(expr, base)
    if op == "eye":
        return torch.eye(args[0], dtype=torch.float64)
    if op == "onehot_product":
        sizes = args[0]
        grids = torch.cartesian_prod(*[torch.arange(n) for n in sizes]).reshape(-1, len(sizes))
        return torch.cat([torch.nn.functional.one_hot(grids[:, i], n).to(torch.float64)
                          for i, n in enumerate(sizes)], dim=-1)
    if op == "pad_kernel":
        w, before, size = evaluate(args[0], base), args[1], args[2]
        out = torch.zeros(tuple(w.shape[:2]) + tuple(size), dtype=torch.float64)
        index = (slice(None), slice(None)) + tuple(slice(b, b + k) for b, k in zip(before, w.shape[2:]))
        out[index] = w
        return out
    if op == "identity_kernel":
        shape = args[0]
        out = torch.zeros(shape, dtype=torch.float64)
        centre = tuple(k // 2 for k in shape[2:])
        for o in range(shape[0]):  # a grouped conv's weight holds each group's inputs: o's is o mod in
            out[(o, o % shape[1]) + centre] = 1.0
        return out
    if op == "zeros":
        return torch.zeros(args[0], dtype=torch.float64)
    if op == "ones":
        return torch.ones(args[0], dtype=torch.float64)
    raise ValueError(f"unknown weight expression {op!r}")


def materialise(graph: Graph, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters of an optimised `graph`, from the parameters `base` of the graph it came from.

    A parameter with a `derive` expression is computed from `base` in float64, then cast to its
    dtype; any other parameter is taken from `base` by name.
    """
    out: dict[str, torch.Tensor] = {}
    for _, node in graph.nodes():
        for p in node.params:
            if p.tied_to is not None:
                continue
            name = ".".join(node.path + (p.name,))
            dtype = getattr(torch, DTYPES[p.dtype])
            if p.derive is not None:
                value = evaluate(p.derive, base).to(dtype)
            else:
                value = base[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"parameter {name}: computed shape {tuple(value.shape)}, declared {p.shape}")
            out[name] = value.contiguous()
    return out


#: mlp's activations (compiler/ops.py ACTIVATIONS): the ops of those names at their default arguments.
_MLP_ACTS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
             "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": torch.nn.functional.softplus,
             "leaky_relu": torch.nn.functional.leaky_relu, "elu": torch.nn.functional.elu,
             "hardswish": torch.nn.functional.hardswish, "mish": torch.nn.functional.mish, "identity": lambda t: t}


def _chain_step(x: torch.Tensor, step: tuple, base: dict[str, torch.Tensor]) -> torch.Tensor:
    """One per-token op of a folded lookup chain, applied to table rows `x` [num, d] in float64."""
    import torch.nn.functional as F

    op, attrs, params = step
    a = dict(attrs)
    p = {name: evaluate(expr, base) for name, expr in params}
    acts = {"relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "exp": torch.exp,
            "abs": torch.abs, "neg": torch.neg, "identity": lambda t: t,
            "gelu": lambda t: F.gelu(t, approximate=a.get("approximate", "none"))}
    if op == "linear":
        return F.linear(x, p["weight"], p.get("bias"))
    if op == "layer_norm":
        return F.layer_norm(x, (x.shape[-1],), p.get("weight"), p.get("bias"), a["eps"])
    if op == "rms_norm":
        return F.rms_norm(x, (x.shape[-1],), p.get("weight"), a["eps"])
    if op == "mlp":
        h = _MLP_ACTS[a["act"]](F.linear(x, p["fc1.weight"], p.get("fc1.bias")))
        return F.linear(h, p["fc2.weight"], p.get("fc2.bias"))
    if op == "dropout":
        return x
    if op in acts:
        return acts[op](x)
    if op in ("add", "sub", "mul", "div"):
        v, left = a["value"], a["left"]
        fn = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[op]
        return fn(torch.full_like(x, v), x) if left else fn(x, v)
    raise ValueError(f"no folding rule for op {op!r}")


def evaluate_chain(expr: tuple, base: dict[str, torch.Tensor]) -> torch.Tensor:
    _, table, steps = expr
    x = evaluate(table, base)
    for step in steps:
        x = _chain_step(x, step, base)
    return x
