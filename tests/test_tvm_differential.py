"""Differential testing of the two backends over random valid specs: each generated spec (tests/specgen.py)
is built by the PyTorch backend at -O0 and run in float64 (the oracle), and compiled for tvm-llvm at
-O0 or -O2 (drawn) on the same weights; one compiled library runs at two sizes of B and T.

Tolerance (test_tvm_equivalence's): max |tvm - oracle| <= 1e-4 * max(1, max |oracle|) per output.
A failure shrinks to a minimal spec, printed as spec text with the opt level (Hypothesis `note`).

Each example compiles a TVM library (about a second or two here), so the example counts are small
(about a minute for the file on this 2-core machine); raise them with SPECC_TVM_EXAMPLES=N.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

pytest.importorskip("tvm")

import specc  # noqa: E402
from equivalence import perturbed_weights  # noqa: E402
from specc.backends.pytorch.build import artifacts, load_in_memory  # noqa: E402
from specc.backends.pytorch.weights import materialise  # noqa: E402
from specc.backends.tvm.build import compile_graph  # noqa: E402
from specc.compiler.passes import PassContext, optimize  # noqa: E402
from specgen import image_specs, masked_specs, specs  # noqa: E402

TOL = 1e-4
SCALE = int(os.environ.get("SPECC_TVM_EXAMPLES", "0"))


def examples(n: int) -> settings:
    return settings(max_examples=SCALE or n, deadline=None, derandomize=not SCALE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def float64_run(model: torch.nn.Module, inputs) -> tuple[torch.Tensor, ...]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # values the model creates (ones, zeros, angles) in float64 too
    try:
        with torch.no_grad():
            out = model(*[x.double() if x.is_floating_point() else x for x in inputs])
    finally:
        torch.set_default_dtype(previous)
    return out if isinstance(out, tuple) else (out,)


def torch_equals_tvm(text: str, opt_level: int, runs: list[dict]) -> None:
    note(f"tvm-llvm at -O{opt_level}, spec:\n{text}")
    graph = specc.compile(text)
    weights = perturbed_weights(graph)
    oracle = load_in_memory(artifacts(graph, text, "generated.yaml", weights=weights,
                                      ctx=PassContext(opt_level=0))).double()
    optimised, _ = optimize(graph, PassContext(opt_level=opt_level, verify_each=True))
    runner = compile_graph(optimised, weights=materialise(optimised, weights))
    names = [n for n, _ in graph.outputs]
    for seed, dims in enumerate(runs):
        inputs = oracle.example_inputs(seed=seed, **dims)
        want = float64_run(oracle, inputs)
        got = runner(*inputs)
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(want)
        for name, g, w in zip(names, got, want):
            assert tuple(g.shape) == tuple(w.shape), f"{name} at {dims}: shape {tuple(g.shape)} vs {tuple(w.shape)}"
            err = (g.double() - w).abs().max().item()
            bound = TOL * max(1.0, w.abs().max().item())
            assert err <= bound, f"{name} at {dims}: max |tvm - float64 torch| = {err:.3g} > {bound:.3g}"


@examples(20)
@given(text=specs(max_ops=6), opt_level=st.sampled_from([0, 2]))
def test_torch_equals_tvm_on_random_specs(text, opt_level):
    torch_equals_tvm(text, opt_level, [dict(B=1, T=5), dict(B=3, T=7)])


@examples(15)
@given(text=masked_specs(max_ops=5), opt_level=st.sampled_from([0, 2]))
def test_torch_equals_tvm_on_random_mask_and_position_specs(text, opt_level):
    torch_equals_tvm(text, opt_level, [dict(B=1, T=5), dict(B=2, T=8)])


@examples(10)
@given(text=image_specs(max_ops=4), opt_level=st.sampled_from([0, 2]))
def test_torch_equals_tvm_on_random_convolutional_specs(text, opt_level):
    torch_equals_tvm(text, opt_level, [dict(B=1), dict(B=3)])
