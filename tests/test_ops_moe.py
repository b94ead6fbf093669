"""moe_mlp (a mixture of MLP experts with given routing): the built module in float64 against a
hand-written loop over tokens; located errors; FLOPs. Experts upcycled from a dense MLP with init_from=
are tested in tests/test_lang_init_from.py.

Tolerance: generated float64 module vs the float64 loop: max abs error <= 1e-12 (the same products,
batched differently); copies are compared exactly.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import specc
from opcheck import assert_error, flops_of, spec_text

TOL = 1e-12
ACTS = {"gelu": F.gelu, "relu": F.relu}


spec = functools.partial(spec_text, dims="B: 2, T: 5", params="{d: 6, h: 5, E: 3}")

def loop(x, route, w, prefix, act, bias=True):
    """y[b, t] = expert route[b, t] applied to x[b, t], one token at a time."""
    y = []
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            e = int(route[b, t])
            h = w[prefix + "fc1.weight"][e] @ x[b, t] + (w[prefix + "fc1.bias"][e] if bias else 0)
            y.append(w[prefix + "fc2.weight"][e] @ ACTS[act](h) + (w[prefix + "fc2.bias"][e] if bias else 0))
    return torch.stack(y).reshape(x.shape[0], x.shape[1], -1)


@pytest.mark.parametrize("act, out, bias", [("gelu", None, True), ("relu", 4, False)])
def test_each_token_goes_through_its_expert(act, out, bias):
    extra = (f", out={out}" if out else "") + (", bias=false" if not bias else "") + f", act={act}"
    text = spec("x: 'f32[B, T, d]', r: 'i64[B, T] in range(E)'", f"y = moe_mlp(x, r, E, h{extra})")
    model = specc.load(text).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # distinct experts (the seeded ones already differ; make it obvious)
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    w = {k: v.detach() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    for route in (torch.randint(0, 3, (2, 5), generator=gen), torch.full((2, 5), 2), torch.tensor([[0] * 5, [1] * 5])):
        with torch.no_grad():
            got = model(x, route)
        assert got.shape == (2, 5, out or 6)
        assert (got - loop(x, route, w, "y.", act, bias)).abs().max().item() <= TOL
    assert w["y.fc1.weight"].shape == (3, 5, 6) and w["y.fc2.weight"].shape == (3, out or 6, 5)


def test_moe_errors():
    x_r = "x: 'f32[B, T, d]', r: 'i64[B, T] in range(E)'"
    assert_error(spec("x: 'f32[B, T, d]', r: 'i64[B]'", "y = moe_mlp(x, r, E, h)"), 7, 18,
                 "moe_mlp: route i64[B] must have the shape of x f32[B, T, 6] without its last dimension, [B, T]: "
                 "one expert number per token")
    assert_error(spec("x: 'f32[B, T, d]', r: 'f32[B, T]'", "y = moe_mlp(x, r, E, h)"), 7, 18,
                 "moe_mlp: route must be an integer tensor of expert numbers, got f32[B, T]")
    assert_error(spec("x: 'f32[B, T, d]', r: 'i64[B, T] in range(5)'", "y = moe_mlp(x, r, E, h)"), 7, 18,
                 "moe_mlp: route takes values in range(0, 5), outside the 3 experts")
    assert_error(spec(x_r, "y = moe_mlp(x, r, 0, h)"), 7, 21, "moe_mlp: experts must be positive, got 0")


def test_moe_flops_are_those_of_one_mlp_per_token():
    text = spec("x: 'f32[B, T, d]', r: 'i64[B, T] in range(E)'", "y = moe_mlp(x, r, E, h) + mlp(x, h)")
    for b in (2, 7):
        assert flops_of(text, "moe_mlp", B=b) == flops_of(text, "mlp", B=b) == 2 * b * 5 * (6 * 5 + 5 * 6) + 9 * b * 5 * 5
