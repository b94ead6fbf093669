"""parameter(d0, d1, ...): a free learned tensor (prefix rows, prompt components, key tokens)."""

from __future__ import annotations

import importlib.util
import sys
import uuid

import pytest
import torch

import specc
from specc.compiler.passes import PassContext, optimize
from specc.compiler.printer import print_graph
from specc.dsl.diagnostics import SpecError
from specc.verify import verify

SPEC = """\
specc: 1
name: prefix_demo
params:
  d: 8
  L: 3
dims:
  B: 2
  T: 5
inputs:
  x: f32[B, T, d]
graph: |
  P = parameter(L, d, init=normal(0.02))
  Q = parameter(L, d)
  Z = parameter(L, d, init=zeros, frozen=true)
  h = linear(x, d) + mean(P + Q + Z, dim=0)
outputs:
  h: f32[B, T, d]
"""


def write(tmp_path, text: str):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def load_module(out):
    spec = importlib.util.spec_from_file_location(f"m_{uuid.uuid4().hex}", out / "model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_parameters_are_learned_tensors_with_their_initialisers(tmp_path):
    out = tmp_path / "out"
    specc.build(write(tmp_path, SPEC), out)
    m = load_module(out).load()
    params = dict(m.named_parameters())
    assert {n: tuple(p.shape) for n, p in params.items()} == {
        "P.weight": (3, 8), "Q.weight": (3, 8), "Z.weight": (3, 8), "linear.weight": (8, 8), "linear.bias": (8,)}
    assert params["P.weight"].requires_grad and not params["Z.weight"].requires_grad
    assert torch.count_nonzero(params["Z.weight"]) == 0
    assert 0.005 < float(params["P.weight"].detach().std()) < 0.05  # normal(0.02)
    assert 0.5 < float(params["Q.weight"].detach().std()) < 2.0     # the default N(0, 1)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    m = m.double()
    ref = x @ params["linear.weight"].detach().double().T + params["linear.bias"].detach().double() \
        + (params["P.weight"] + params["Q.weight"]).detach().double().mean(0)
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)
    # gradients reach the trainable parameters only
    m(x).sum().backward()
    assert params["P.weight"].grad is not None and params["Z.weight"].grad is None


def test_two_parameters_of_one_shape_stay_two_after_optimisation(tmp_path):
    graph, _ = optimize(specc.compile(write(tmp_path, SPEC)), PassContext(opt_level=2))
    assert print_graph(graph, show_span=False).count("= parameter(") == 3
    assert verify(write(tmp_path, SPEC), examples=3).ok


def test_summary_counts_parameter_tensors(tmp_path):
    s = specc.check(write(tmp_path, SPEC))
    assert s.params == 3 * 24 + 72 and s.trainable_params == 2 * 24 + 72


@pytest.mark.parametrize("graph, message", [
    ("P = parameter(T, d)", "symbolic dimension"),
    ("P = parameter(0, d)", "must be positive"),
    ("P = parameter()", "at least one size"),
])
def test_bad_sizes_are_located_errors(tmp_path, graph, message):
    text = SPEC.replace("  P = parameter(L, d, init=normal(0.02))", "  " + graph)
    with pytest.raises(SpecError) as err:
        specc.check(write(tmp_path, text))
    assert message in str(err.value) and "spec.yaml:12:" in str(err.value)


def test_tvm_llvm_reads_parameters_from_the_weights(tmp_path):
    result = verify(write(tmp_path, SPEC), examples=3, target="tvm-llvm")
    assert result.ok
