"""cumsum(x, dim=-1, reverse=false): running sums along one dimension, as torch.cumsum; reverse=true sums
from the end (torch: x.flip(d).cumsum(d).flip(d)). Integer and bool tensors sum to i64.

References are torch's cumsum of the float64 (or int64) inputs. Float tolerances: 1e-10 for the float64
module (the same sums, in float64), and 1e-5 of the largest running sum for float32 results (torch sums
float32 in a float64 accumulator on CPU, TVM in float32: T terms of O(1) round by about T * 6e-8).
"""

from __future__ import annotations

import functools

import pytest
import torch

import specc
from opcheck import TOL, assert_error, flops_of, output_types, spec_text

spec = functools.partial(spec_text, dims="B: 2, T: 5")
INPUTS = "x: 'f32[B, T, 3]', i: 'i32[B, T]', b: 'bool[B, T]', w: 'f32[B, T, 2, 3]'"
GRAPH = """\
a = cumsum(x, dim=1)
r = cumsum(x, reverse=true)
s = cumsum(x, dim=-2, reverse=true) * 0.5
ci = cumsum(i)
cb = cumsum(b, dim=1, reverse=true)
cw = cumsum(w, dim=1)
"""
OUTS = "a r s ci cb cw"
TEXT = spec(INPUTS, GRAPH, OUTS)


def reference(x, i, b, w) -> list[torch.Tensor]:
    x = x.double()
    rev = lambda t, d: t.flip(d).cumsum(d).flip(d)  # noqa: E731
    return [x.cumsum(1), rev(x, -1), rev(x, -2) * 0.5, i.long().cumsum(-1), rev(b.long(), 1), w.double().cumsum(1)]


def operands(rows: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, length, 3, generator=g), torch.randint(-9, 10, (rows, length), generator=g,
                                                                      dtype=torch.int32),
            torch.rand(rows, length, generator=g) > 0.5, torch.randn(rows, length, 2, 3, generator=g))


def close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape, what
    if not want.is_floating_point():
        assert got.dtype == torch.int64 and torch.equal(got, want), what
        return
    err = (got.double() - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: {err}"


def test_types():
    assert output_types(TEXT) == ["f32[B, T, 3]"] * 3 + ["i64[B, T]"] * 2 + ["f32[B, T, 2, 3]"]
    assert output_types(spec("h: 'f16[B, T]', u: 'u8[B, T]'", "p = cumsum(h)\nq = cumsum(u, dim=0)", "p q")) \
        == ["f16[B, T]", "i64[B, T]"]


def test_errors_are_located():
    assert_error(spec("x: 'f32[B, T]'", "y = cumsum(x, dim=2)"), 6, 17,
                 "cumsum: dimension 2 is out of range for a rank-2 tensor")
    assert_error(spec("x: 'f32[B, T]'", "y = cumsum(sum(x))"), 6, 14,
                 "cumsum: x f32[] has no dimension to sum along")
    assert_error(spec("x: 'f32[B, T]'", "y = cumsum(x, reverse=1)"), 6, 17,
                 "cumsum(): argument 'reverse' must be true or false, got the integer 1")


def test_flops_count_one_per_element():
    assert flops_of(TEXT, "cumsum") == 3 * 30 + 2 * 10 + 60  # B * T * 3 = 30, B * T = 10


@pytest.mark.parametrize("opt_level", [0, 1, 2])
def test_torch_matches_torch_float64(opt_level):
    model = specc.load(TEXT, opt_level=opt_level)
    for rows, length in ((2, 5), (3, 1), (1, 9)):
        ops = operands(rows, length)
        want = reference(*ops)
        with torch.no_grad():
            got64 = model.double()(*(t.double() if t.is_floating_point() else t for t in ops))
            got32 = model.float()(*ops)
        for name, g64, g32, w in zip(OUTS.split(), got64, got32, want):
            close(g64, w, TOL, f"-O{opt_level} float64 {name}")
            close(g32, w, 1e-5, f"-O{opt_level} float32 {name}")
            if w.is_floating_point():
                assert g64.dtype == torch.float64 and g32.dtype == torch.float32


def _runner_of_lowering(graph, target_kind: str):
    """The graph lowered as for `target_kind` and compiled for this CPU: a callable of torch tensors."""
    import numpy as np
    import tvm
    from tvm import relax

    from specc.backends.tvm.build import FUNC, make_target, pipeline
    from specc.backends.tvm.lowering import to_relax

    mod, _ = to_relax(graph, target_kind, FUNC)
    tgt = make_target("llvm")
    with tgt:
        ex = tvm.compile(mod, tgt, relax_pipeline=pipeline(tgt))
    vm = relax.VirtualMachine(ex, tvm.cpu())

    def run(*xs):
        out = vm[FUNC](*(tvm.runtime.tensor(np.ascontiguousarray(t.numpy())) for t in xs))
        return [torch.from_numpy(out[k].numpy()) for k in range(len(out))]

    return run


def test_tvm_llvm_matches_torch():
    """The library (symbolic B and T) at three sizes; and the lowering written for GPUs (a cumsum along
    another axis than the last goes through a transpose there), compiled for this CPU."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph
    from specc.compiler.passes import PassContext, optimize

    graph, _ = optimize(specc.compile(TEXT), PassContext(opt_level=2))
    runners = {"llvm": compile_graph(graph, weights={}), "cuda": _runner_of_lowering(graph, "cuda")}
    for kind, runner in runners.items():
        for rows, length in ((2, 5), (3, 1), (1, 9)):
            ops = operands(rows, length, seed=rows)
            for name, g, w in zip(OUTS.split(), runner(*ops), reference(*ops)):
                close(g, w, 1e-5, f"tvm ({kind} lowering) {name} at B={rows}, T={length}")
