"""Deterministic weight initialisation from a seed, following each parameter's declared initialiser."""

from __future__ import annotations

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
    raise ValueError(f"unknown initialiser {init}")


def init_weights(graph: Graph, seed: int | None = None) -> dict[str, torch.Tensor]:
    """All parameters of `graph` (tied ones once, at their owner), initialised from `seed`.

    The order is the graph's deterministic node order, so a seed always gives the same tensors.
    """
    gen = torch.Generator().manual_seed(graph.seed if seed is None else seed)
    out: dict[str, torch.Tensor] = {}
    for _, node in graph.nodes():
        for p in node.params:
            if p.tied_to is not None:
                continue
            name = ".".join(node.path + (p.name,))
            t = torch.empty(p.shape, dtype=torch.float32)
            out[name] = _fill(t, p.init, gen).to(getattr(torch, DTYPES[p.dtype]))
    return out


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
    if op == "rsqrt_add":
        return torch.rsqrt(evaluate(args[0], base) + float(args[1]))
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
