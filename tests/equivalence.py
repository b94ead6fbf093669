"""The equivalence harness shared by the pass tests: a spec built with and without passes, run on
the same weights and inputs, compared against a float64 run of the unoptimised model (the oracle).

Tolerances (float32 models against the float64 oracle): |got - want| <= ATOL + RTOL * |want|,
ATOL = RTOL = 1e-4; a rewrite that changes the function misses this by orders of magnitude.
"""

from __future__ import annotations

import torch

import specc
from specc.backends.pytorch.build import artifacts, load_in_memory
from specc.backends.pytorch.weights import init_weights
from specc.compiler.passes import PassContext

ATOL = RTOL = 1e-4


def perturbed_weights(graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights with noise on every tensor, so norm gains of exactly 1 and zero biases hide nothing."""
    weights = init_weights(graph)
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
            for k, v in weights.items()}


def build(text: str, ctx: PassContext, weights=None):
    graph = specc.compile(text)
    weights = perturbed_weights(graph) if weights is None else weights
    files = artifacts(graph, text, "generated.yaml", ctx=ctx, weights=weights)
    return load_in_memory(files), files


def outputs(model, inputs, dtype=None) -> tuple[torch.Tensor, ...]:
    previous = torch.get_default_dtype()
    if dtype is not None:
        model = model.to(dtype)
        inputs = tuple(i.to(dtype) if i.is_floating_point() else i for i in inputs)
        torch.set_default_dtype(dtype)  # values the model creates (one_hot) follow the run's dtype
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        torch.set_default_dtype(previous)
    return out if isinstance(out, tuple) else (out,)


def assert_equivalent(text: str, ctx: PassContext, seed: int = 0, **dims) -> tuple[float, object]:
    """Build `text` at -O0 and with `ctx`; assert equal outputs. Returns the worst error and the
    optimised build's manifest bytes."""
    graph = specc.compile(text)
    weights = perturbed_weights(graph, seed)
    reference, _ = build(text, PassContext(opt_level=0), weights)
    optimised, files = build(text, ctx, weights)
    inputs = reference.example_inputs(seed=seed, **dims)
    oracle = outputs(reference, inputs, torch.float64)
    got = outputs(optimised, inputs)
    worst = 0.0
    for want, have in zip(oracle, got):
        assert have.shape == want.shape
        err = (have.double() - want).abs()
        bound = ATOL + RTOL * want.abs()
        worst = max(worst, float(err.max()))
        assert bool((err <= bound).all()), f"max error {float(err.max()):.3g}\n{text}"
    return worst, files


def only(name: str, opt_level: int = 2) -> PassContext:
    """A context that runs just the pass `name` (and verifies the IR after it)."""
    from specc.compiler.passes import PASSES

    return PassContext(opt_level=opt_level, disabled=frozenset(set(PASSES) - {name}), verify_each=True)


def ir_after(text: str, name: str) -> str:
    """The IR text (without source locations) after running only the pass `name`."""
    from specc.compiler.passes import optimize
    from specc.compiler.printer import print_graph

    graph, _ = optimize(specc.compile(text), only(name))
    return print_graph(graph, show_span=False)
