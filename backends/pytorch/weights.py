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
