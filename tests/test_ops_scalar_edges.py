"""Edge cases of the shape rules: dimensions of a scalar (rank 0), softplus's beta, huge slice steps,
flip's argument. Each bad case is a located error at `specc check` (they were internal errors: an index
out of range in the rule, or a crash in a backend); each good one runs on both backends as torch does.

Reference: torch in float64 on the same input; tvm-llvm within 1e-6 (a sum of four float32 values)."""

from __future__ import annotations

import pytest
import torch

import specc
from opcheck import assert_error, output_types, spec_text


def spec(graph: str, outputs: str = "y") -> str:
    return spec_text("x: 'f32[B, 4]'", "s = sum(x)\n" + graph, outputs)


@pytest.mark.parametrize("expr, col, message", [
    ("concat([s, s], dim=0)", 22, "concat: a scalar (rank 0) has no dimension 0"),
    ("concat([s, s])", 7, "concat: a scalar (rank 0) has no dimension -1"),
    ("transpose(s, 0, 0)", 20, "transpose: a scalar (rank 0) has no dimension 0"),
    ("split(s, 1, dim=0)", 19, "split: a scalar (rank 0) has no dimension 0"),
    ("permute(s, [])", 15, "permute: expected a tensor of rank >= 1 for 'x', got f32[]"),
    ("softmax(s, dim=1)", 18, "softmax: dimension 1 is out of range for a rank-0 tensor"),
    ("sum(s, dim=-2)", 14, "sum: dimension -2 is out of range for a rank-0 tensor"),
    ("flip(x, [0, 1, 2])", 15, "flip: dimension 2 is out of range for a rank-2 tensor"),
    ("softplus(x, beta=0.0)", 19, "softplus: beta must be a positive number, got 0.0"),
    ("softplus(x, beta=-1.0)", 19, "softplus: beta must be a positive number, got -1.0"),
    ("x[:, ::2**63]", 14, "slice steps must be at most 2**62, got 9223372036854775808 (a step as large as the "
                          "dimension already takes its first entry alone)"),
])
def test_located_errors(expr, col, message):
    assert_error(spec(f"y = {expr}"), 7, col, message)


GOOD = {"f": "flip(s, 0)", "m": "softmax(s, dim=0)", "u": "sum(s, dim=0)", "a": "mean(s, dim=[0], keepdim=true)",
        "k": "x[:, ::2**62]", "n": "softmax(s)", "v": "sum(s, dim=-1)", "r": "flip(s, [-1])"}  # -1 too, as torch


def test_what_torch_takes_of_a_scalar_runs_on_both_backends():
    text = spec("".join(f"{k} = {v}\n" for k, v in GOOD.items()), " ".join(GOOD))
    x = torch.randn(2, 4, dtype=torch.float64)
    s = x.sum()
    want = (torch.flip(s, [0]), torch.softmax(s, 0), s.sum(0), s.mean([0], keepdim=True), x[:, ::2 ** 62],
            torch.softmax(s, -1), s.sum(-1), torch.flip(s, [-1]))
    got = specc.load(text).double()(x)
    for name, g, w in zip(GOOD, got, want):
        assert g.shape == w.shape and torch.allclose(g, w, rtol=0, atol=1e-12), name
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph

    runner = compile_graph(specc.compile(text))
    runner.bind({})
    for name, g, w in zip(GOOD, runner(x.float()), want):
        assert g.shape == w.shape and (g.double() - w).abs().max().item() <= 1e-6, name


def test_a_string_choice_may_be_written_bare():
    """mode=bilinear as mode="bilinear" (as act=gelu names an activation); a typo lists the choices. A name
    the spec defines keeps its value."""
    img = "x: 'f32[B, 3, 4, 4]'"
    bare = spec_text(img, "a = upsample(x, scale=2, mode=bilinear)\nb = upsample(x, scale=2, mode=\"bilinear\")",
                     "a b")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    a, b = specc.load(bare).double()(x)
    assert torch.equal(a, b) and a.shape == (2, 3, 8, 8)
    assert_error(spec_text(img, "y = upsample(x, 2, mode=bilinar)"), 6, 22,
                 "upsample(): argument 'mode' must be one of 'nearest', 'linear', 'bilinear', got 'bilinar' "
                 "(did you mean 'bilinear'?)")
    defined = spec_text(img, "y = upsample(x, 2, mode=m)", params="{m: nearest}")
    assert output_types(defined) == ["f32[B, 3, 8, 8]"]
