"""Sums and products with zeros compute what IEEE arithmetic (torch) gives on every backend and at every
optimisation level: 0 * inf and 0 * nan are nan, -0.0 + 0.0 is +0.0, 0.0 - 0.0 is +0.0, 0 * -1 is -0.0
(and x / that is -inf). TIR's simplifier folds 0 * y to 0, y + 0 to y and 0 - y to -y once fusion inlines
an immediate zero into a kernel, and the neutral-element pass dropped x + 0.0: each was a different
result (a nan lost, a zero's sign flipped, +inf for -inf).

Reference: torch at -O0 in float64 on operands holding +-0, +-1, +-inf and nan; every other result is
compared bit for bit (equal values, nan where the reference is nan, the sign of every zero)."""

from __future__ import annotations

import pytest
import torch

import specc
from opcheck import spec_text

GRAPH = """\
a = zeros(B, 6) * z
b = z * zeros(B, 6)
c = zeros(B, 6) / z
d = x / (zeros(B, 6) * z)
e = zeros(B, 6) + z * 0.0
f = z + 0.0
g = 0.0 + z
h = 0.0 - z
k = zeros(B, 6) - z
m = z - 0.0
n = z + -0.0
p = z * 0.0
q = x / (z * 0.0)
"""
OUTS = "a b c d e f g h k m n p q"
TEXT = spec_text("x: 'f32[B, 6]', z: 'f32[B, 6]'", GRAPH, OUTS, dims="B: 2")
NAN, INF = float("nan"), float("inf")


def operands(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.tensor([[-1.0, NAN, INF, -0.0, 0.0, -INF]] * rows)
    return torch.ones(rows, 6), z


def same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: {got} vs {want}"
    ok = ~want.isnan()
    assert torch.equal(got[ok], want[ok]), f"{what}: {got} vs {want}"
    assert torch.equal(got[ok].signbit(), want[ok].signbit()), f"{what}: the sign of a zero: {got} vs {want}"


def reference(rows: int) -> list[torch.Tensor]:
    x, z = (t.double() for t in operands(rows))
    with torch.no_grad():
        return list(specc.load(TEXT, opt_level=0).double()(x, z))


def test_the_reference_is_ieee():
    x, z = (t.double() for t in operands(1))
    want = reference(1)
    zero = torch.zeros_like(z)
    for name, w, direct in zip(OUTS.split(), want, (zero * z, z * zero, zero / z, x / (zero * z), zero + z * 0.0,
                                                   z + 0.0, 0.0 + z, 0.0 - z, zero - z, z - 0.0, z + -0.0, z * 0.0,
                                                   x / (z * 0.0))):
        same_bits(w, direct, name)


@pytest.mark.parametrize("opt_level", [1, 2])
def test_optimised_torch_builds_keep_every_zero(opt_level):
    want = reference(2)
    model = specc.load(TEXT, opt_level=opt_level)
    with torch.no_grad():
        got = model(*operands(2))
    for name, g, w in zip(OUTS.split(), got, want):
        same_bits(g, w, f"-O{opt_level} {name}")


def test_the_neutral_element_pass_drops_only_exact_identities():
    from specc.compiler.passes import PassContext, optimize

    graph, _ = optimize(specc.compile(TEXT), PassContext(opt_level=1))
    adds = {n.name for _, n in graph.nodes() if n.op in ("add", "sub")}
    assert {"f", "g", "h"} <= adds  # z + 0.0, 0.0 + z and 0.0 - z stay: -0.0 + 0.0 is +0.0
    assert not {"m", "n"} & adds  # z - 0.0 and z + -0.0 are z, bit for bit


@pytest.mark.parametrize("opt_level", [0, 2])
def test_tvm_llvm_keeps_every_zero(opt_level):
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph
    from specc.compiler.passes import PassContext, optimize

    graph, _ = optimize(specc.compile(TEXT), PassContext(opt_level=opt_level))
    runner = compile_graph(graph, weights={})
    runner.bind({})
    for rows in (1, 3):
        want = reference(rows)
        for name, g, w in zip(OUTS.split(), runner(*operands(rows)), want):
            same_bits(g, w, f"tvm -O{opt_level} {name} at B={rows}")
