"""grad_reverse(x, scale): the identity forward, the gradient times -scale backward (DANN's gradient
reversal layer, SEEDS.md row 10). Small specs are built through specc and run in float64.

Exactness: the forward output is x itself (compared with torch.equal). The gradient at the reversal
point is one float64 multiplication of the incoming gradient, so it equals -scale * g exactly. Gradients
further upstream pass through the same backward ops on a scaled vector: with scale a power of two that
scaling is exact, so they equal -scale times the plain gradient bit for bit; with any other scale they
agree to float64 rounding (relative error <= 1e-12).
"""

from __future__ import annotations

import functools

import pytest
import torch

import specc
from opcheck import assert_error, flops_of, load64, spec_text
from specc.compiler.passes import PassContext, optimize
from specc.compiler.printer import print_graph

REL = 1e-12
#: -O2 vs -O0: fused weights are computed in float64 but stored in float32 (relative rounding ~6e-8).
FUSED = 1e-6


spec = functools.partial(spec_text, dims="B: 3")

CHAIN = spec("x: 'f32[B, 4]', lam: 'f32[]'", "h = linear(x, 6)\nr = grad_reverse(h, lam)\ny = linear(r, 2)")
PLAIN = spec("x: 'f32[B, 4]', lam: 'f32[]'", "h = linear(x, 6)\nr = h\ny = linear(r, 2)")


def grads(model, x, lam, upstream):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    y = model(x, lam)
    (y * upstream).sum().backward()
    return x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}, y


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, 2, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("lam, exact", [(0.25, True), (1.0, True), (0.7310585786300049, False), (0.0, True)])
def test_gradient_is_minus_scale_times_the_plain_one(lam, exact):
    rev, plain = load64(CHAIN, opt_level=0), load64(PLAIN, opt_level=0)
    plain.load_state_dict(rev.state_dict())
    x, up = data()
    lam_t = torch.tensor(lam, dtype=torch.float64)
    gx, gp, y = grads(rev, x, lam_t, up)
    px, pp, py = grads(plain, x, lam_t, up)
    assert torch.equal(y, py)  # forward: the identity
    assert torch.equal(gp["y.weight"], pp["y.weight"]) and torch.equal(gp["y.bias"], pp["y.bias"])  # downstream
    for got, want in [(gx, px), (gp["h.weight"], pp["h.weight"]), (gp["h.bias"], pp["h.bias"])]:
        if exact:
            assert torch.equal(got, -lam * want)
        else:
            assert (got - (-lam * want)).abs().max() <= REL * want.abs().max()


def test_gradient_at_the_reversal_point_is_exact_for_any_scale():
    text = spec("x: 'f32[B, 4]', lam: 'f32[]'", "y = grad_reverse(x, lam)")
    model = load64(text)
    x, _ = data()
    g = torch.randn(3, 4, dtype=torch.float64)
    for lam in (0.1, 0.46211715726000974, 3.0):
        xg = x.clone().requires_grad_(True)
        y = model(xg, torch.tensor(lam, dtype=torch.float64))
        assert torch.equal(y, x)
        (y * g).sum().backward()
        assert torch.equal(xg.grad, -lam * g)


def test_a_number_scale_and_no_gradient_to_the_scale():
    text = spec("x: 'f32[B, 4]'", "y = grad_reverse(x, 0.5) * 2.0")
    model = load64(text)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, -1.0))
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    xg = x.detach().clone().requires_grad_(True)
    y = load64(spec("x: 'f32[B, 4]', lam: 'f32[]'", "y = grad_reverse(x, lam)"))(xg, lam)
    y.sum().backward()
    assert lam.grad is None and xg.grad is not None


def test_passes_keep_the_reversal():
    """-O2 keeps it between the two linear layers (merge_linear_chains must not look through it), cse
    computes two reversals of one value with one scale once (which leaves every gradient the same), and
    the optimised model's gradients equal the -O0 model's."""
    text = spec("x: 'f32[B, 4]', lam: 'f32[]'",
                "h = linear(x, 6)\nr = grad_reverse(h, lam)\ns = grad_reverse(h, lam)\nt = grad_reverse(h, 0.5)\n"
                "y = linear(linear(r, 5), 2) + linear(s, 2) + linear(t, 2)")
    ir = print_graph(optimize(specc.compile(text), PassContext(opt_level=2))[0], show_span=False)
    assert ir.count("= grad_reverse(") == 2, ir
    o0, o2 = load64(text, opt_level=0), load64(text, opt_level=2)
    x, _ = data(1)
    up = torch.randn(3, 2, dtype=torch.float64)
    lam = torch.tensor(0.8, dtype=torch.float64)
    gx0, _, y0 = grads(o0, x, lam, up)  # -O2's weights may be fused: compare outputs and input gradients
    gx2, _, y2 = grads(o2, x, lam, up)
    assert (y0 - y2).abs().max() <= FUSED * y0.abs().max() and (gx0 - gx2).abs().max() <= FUSED * gx0.abs().max()
    plain = load64(text.replace("grad_reverse(h, lam)", "h").replace("grad_reverse(h, 0.5)", "h"), opt_level=0)
    gxp, _, _ = grads(plain, x, lam, up)
    assert (gx0 - gxp).abs().max() > 0.1 * gxp.abs().max()  # the reversal changed the input gradient


def test_generated_code_calls_the_helper(tmp_path):
    src = (specc.build(CHAIN, tmp_path / "o") / "model.py").read_text()
    assert "class GradReverse(torch.autograd.Function):" in src and "r = GradReverse.apply(h, lam)" in src


def test_flops_are_zero():
    assert flops_of(CHAIN, "grad_reverse", B=8) == 0


@pytest.mark.parametrize("graph, col, message", [
    ("y = grad_reverse(x, s)", 23, "grad_reverse: scale must be a float scalar (e.g. an input lambda_p: f32[] or a "
                                   "number), got f32[B, 4]"),
    ("y = grad_reverse(n, 1.0)", 20, "grad_reverse: expected a floating-point tensor for 'x', got i64[B, 4]"),
    ("y = grad_reverse(x, k)", 23, "grad_reverse: scale must be a float scalar (e.g. an input lambda_p: f32[] or a "
                                   "number), got i64[]"),
])
def test_errors_are_located(graph, col, message):
    assert_error(spec("x: 'f32[B, 4]', s: 'f32[B, 4]', n: 'i64[B, 4]', k: 'i64[]'", graph), 6, col, message)
