"""expand(x, d0, d1, ...): size-1 dimensions repeated to the given sizes (-1 keeps one), new leading
dimensions when more sizes than dimensions are given; a ViT's class token before every batch row's
tokens. Against torch's expand in float64 (equal: no arithmetic), in the generated code, on TVM (float32
against the float64 oracle, 1e-6: a copy), located errors, no FLOPs, gradients summed over the copies.
"""

from __future__ import annotations

import pytest
import torch

import specc
from opcheck import assert_error, flops_of, inputs64, load64, output_types, spec_text

VIT = """\
specc: 1
name: vit_tokens
params: {d: 8, n: 4}
dims: {B: 3}
inputs:
  x: f32[B, n, d]
graph: |
  cls = parameter(1, 1, d)
  tokens = concat([expand(cls, B, 1, d), x], dim=1)
  y = tokens + expand(parameter(n + 1, d), B, -1, -1)
outputs:
  y: f32[B, n + 1, d]
"""


def test_a_class_token_and_positions_for_every_batch_row(tmp_path):
    model = load64(VIT)
    (x,) = inputs64(model)
    sd = model.state_dict()
    cls, pos = sd["cls.weight"], sd["parameter.weight"]
    with torch.no_grad():
        y = model(x)
    want = torch.cat([cls.expand(3, 1, 8), x], dim=1) + pos.expand(3, -1, -1)
    assert torch.equal(y, want)
    src = (specc.build(VIT, tmp_path / "o") / "model.py").read_text()
    assert "cls.expand(B, 1, 8)" in src and ".expand(B, -1, -1)" in src
    # the one class token gets the gradient of every row's copy
    model = load64(VIT)
    model(x).sum().backward()
    assert torch.equal(model.cls.weight.grad, torch.full((1, 1, 8), 3.0, dtype=torch.float64))


def test_shapes_and_flops():
    assert output_types(spec_text("x: 'f32[B, T, 1]'", "y = expand(x, -1, T, 4)")) == ["f32[B, T, 4]"]
    assert output_types(spec_text("x: 'i64[T] in range(5)', z: 'f32[B, T]'", "y = expand(x, 2, B, T)")) == \
        ["i64[2, B, T] in range(5)"]
    assert flops_of(spec_text("x: 'f32[1, T]', z: 'f32[B]'", "y = expand(x, B, T)"), "expand", B=2, T=3) == 0


def test_errors_are_located():
    assert_error(spec_text("x: 'f32[B, T]'", "y = expand(x, B, 4)"), 6, 17,
                 "expand: dimension 1 of f32[B, T] is T, which can only stay T, not become 4 (only size-1 "
                 "dimensions repeat)")
    assert_error(spec_text("x: 'f32[B, T]'", "y = expand(x, 4)"), 6, 17,
                 "expand: 1 sizes for f32[B, T], which has 2 dimensions; give one size per dimension (-1 keeps "
                 "it), and more for new leading ones")
    assert_error(spec_text("x: 'f32[1, T]'", "y = expand(x, -1, 2, T)"), 6, 17,
                 "expand: size 0 is -1, but it is a new leading dimension, which has no size to keep")


def test_tvm():
    pytest.importorskip("tvm")
    from specc.backends.pytorch.weights import init_weights
    from specc.backends.tvm.build import compile_graph

    graph = specc.compile(VIT)
    weights = init_weights(graph)
    runner = compile_graph(graph, weights=weights)
    model = specc.load(VIT, opt_level=0)
    model.load_state_dict(weights)
    for b in (1, 3):
        x = torch.randn(b, 4, 8)
        with torch.no_grad():
            want = model.double()(x.double())
        assert (runner(x).double() - want).abs().max() < 1e-6
