"""detach(x): the identity forward, no gradient into x backward (a stop-gradient; counter-current
learning's detached layer inputs, SEEDS.md row 15). Small specs are built through specc and run in
float64.

Exactness: the forward output is x itself (torch.equal). Backward, a detached path contributes nothing:
the layers before a detach get no gradient at all (grad None, not a zero tensor), the layers after it
the same gradient as in the spec without the detach (the same backward ops on the same values, so
torch.equal), and in y = detach(h) * h the gradient reaching h is exactly detach(h) * g (one product,
computed the same way).
"""

from __future__ import annotations

import functools

import pytest
import torch

import specc
from opcheck import assert_error, flops_of, load64, spec_text
from specc.compiler.passes import PassContext, optimize
from specc.compiler.printer import print_graph

spec = functools.partial(spec_text, dims="B: 3")

CHAIN = spec("x: 'f32[B, 4]'", "h = linear(x, 6)\nd = detach(h)\ny = linear(d, 2)")
PLAIN = spec("x: 'f32[B, 4]'", "h = linear(x, 6)\nd = h\ny = linear(d, 2)")


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, 2, generator=gen, dtype=torch.float64)


def grads(model, x, upstream):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * upstream).sum().backward()
    return x.grad, {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}, y


def test_forward_is_the_identity_and_no_gradient_flows_back():
    det, plain = load64(CHAIN, opt_level=0), load64(PLAIN, opt_level=0)
    plain.load_state_dict(det.state_dict())
    x, up = data()
    gx, g, y = grads(det, x, up)
    px, p, py = grads(plain, x, up)
    assert torch.equal(y, py) and y.dtype == torch.float64
    assert gx is None and g["h.weight"] is None and g["h.bias"] is None  # nothing crosses the detach
    assert px.abs().max() > 0 and p["h.weight"].abs().max() > 0  # ... where without it the gradient is non-zero
    assert torch.equal(g["y.weight"], p["y.weight"]) and torch.equal(g["y.bias"], p["y.bias"])  # after it: unchanged


def test_only_the_attached_path_carries_gradient():
    """y = detach(h) * h: the gradient reaching h is detach(h) * g (the product rule's other term is cut)."""
    model = load64(spec("x: 'f32[B, 4]'", "y = detach(x) * x"))
    x, _ = data(1)
    g = torch.randn(3, 4, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    assert torch.equal(y, x * x)
    (y * g).sum().backward()
    assert torch.equal(xg.grad, x * g)  # without the detach it would be 2 x g


def test_passes_keep_the_detach():
    """-O2 keeps it after h (merge_linear_chains merges the layers after it, never through it), cse
    computes two detaches of one value once (which leaves every gradient the same), and the optimised
    model's gradients equal the -O0 model's: none for the layer before the detach."""
    text = spec("x: 'f32[B, 4]'", "h = linear(x, 6)\nr = detach(h)\ns = detach(h)\ny = linear(linear(r, 5), 2) + linear(s, 2)")
    ir = print_graph(optimize(specc.compile(text), PassContext(opt_level=2))[0], show_span=False)
    h_id = next(ln.split(":")[0].strip() for ln in ir.splitlines() if "@h {" in ln)
    assert ir.count("= detach(") == 1 and f"= detach({h_id})" in ir, ir  # h stays a layer of its own
    o0, o2 = load64(text, opt_level=0), load64(text, opt_level=2)
    x, _ = data(2)
    up = torch.randn(3, 2, dtype=torch.float64)
    gx0, g0, y0 = grads(o0, x, up)
    gx2, g2, y2 = grads(o2, x, up)
    assert gx0 is None and gx2 is None
    assert g0["h.weight"] is None and g2["h.weight"] is None
    assert (y0 - y2).abs().max() <= 1e-6 * y0.abs().max()  # -O2's fused weights are stored in float32


def test_generated_code_and_flops(tmp_path):
    src = (specc.build(CHAIN, tmp_path / "o") / "model.py").read_text()
    assert "d = h.detach()" in src
    assert flops_of(CHAIN, "detach", B=8) == 0


@pytest.mark.parametrize("graph, col, message", [
    ("y = detach(n)", 14, "detach: expected a floating-point tensor for 'x', got i64[B, 4]"),
    ("y = detach(x, x)", 17, "detach() takes at most 1 positional arguments, got 2"),
    ("y = detach(x, frozen=true)", 17, "detach() owns no parameters, so 'frozen=' does not apply"),
])
def test_errors_are_located(graph, col, message):
    assert_error(spec("x: 'f32[B, 4]', n: 'i64[B, 4]'", graph), 6, col, message)
