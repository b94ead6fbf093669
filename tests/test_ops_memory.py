"""omega_memory (ATLAS's Omega rule with a linear memory, compiler/ops_memory.py): the built module in
float64 against hand-written loops (the delta rule for window 1; for windows c > 1 the window loss's
gradient by autograd, and in closed form), causality, gradients (torch.autograd.gradcheck), numbers
and scalars as step sizes, located errors, FLOPs.

Tolerances (float64): generated module vs a hand-written loop of the same update: max abs error
<= 1e-12 (the same products, summed in another order); gradcheck at its float64 defaults
(eps 1e-6, atol 1e-5, rtol 1e-3); causality exactly (outputs before a changed token are bit-identical).
"""

from __future__ import annotations

import functools

import pytest
import torch

import specc
from opcheck import assert_error, flops_of, spec_text

TOL = 1e-12
DK, DV, STEPS = 3, 2, 7
F64 = "q: 'f64[B, T, dk]', k: 'f64[B, T, dk]', v: 'f64[B, T, dv]'"

spec = functools.partial(spec_text, dims=f"B: 2, T: {STEPS}", params=f"{{dk: {DK}, dv: {DV}}}")


def data(seed=0, b=2, steps=STEPS, heads=()):
    gen = torch.Generator().manual_seed(seed)
    lead = (b, *heads, steps)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = r(*lead, DK), r(*lead, DK) / DK ** 0.5, r(*lead, DV)
    u = lambda: torch.rand(*lead, generator=gen, dtype=torch.float64)  # noqa: E731
    return q, k, v, 0.5 * u(), u(), 0.5 + 0.5 * u()  # lr, gamma, decay


def delta_rule(q, k, v, lr):
    """M_t = M_{t-1} - lr_t (M_{t-1} k_t - v_t) k_t^T, y_t = M_t q_t; one batch row at a time."""
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for b in range(q.shape[0]):
        m = torch.zeros(v.shape[-1], k.shape[-1], dtype=q.dtype)
        for t in range(q.shape[1]):
            m = m - lr[b, t] * torch.outer(m @ k[b, t] - v[b, t], k[b, t])
            out[b, t] = m @ q[b, t]
    return out


def omega_autograd(q, k, v, lr, gamma, decay, window):
    """The Omega rule as the paper states it: M_t = decay_t M_{t-1} - lr_t * grad of
    1/2 sum_{i=t-c+1..t} gamma_i ||M k_i - v_i||^2 at M_{t-1}, the gradient taken by autograd."""
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for b in range(q.shape[0]):
        m = torch.zeros(v.shape[-1], k.shape[-1], dtype=q.dtype)
        for t in range(q.shape[1]):
            m0 = m.detach().requires_grad_(True)
            loss = sum(0.5 * gamma[b, i] * ((m0 @ k[b, i] - v[b, i]) ** 2).sum()
                       for i in range(max(0, t - window + 1), t + 1))
            (grad,) = torch.autograd.grad(loss, m0)
            m = decay[b, t] * m - lr[b, t] * grad
            out[b, t] = m @ q[b, t]
    return out


def omega_closed_form(q, k, v, lr, gamma, decay, window):
    """The same in closed form: grad = sum_i gamma_i (M k_i - v_i) k_i^T."""
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for b in range(q.shape[0]):
        m = torch.zeros(v.shape[-1], k.shape[-1], dtype=q.dtype)
        for t in range(q.shape[1]):
            grad = sum(gamma[b, i] * torch.outer(m @ k[b, i] - v[b, i], k[b, i])
                       for i in range(max(0, t - window + 1), t + 1))
            m = decay[b, t] * m - lr[b, t] * grad
            out[b, t] = m @ q[b, t]
    return out


def err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_window_one_is_the_delta_rule():
    model = specc.load(spec(F64 + ", lr: 'f64[B, T]'", "y = omega_memory(q, k, v, lr)"))
    q, k, v, lr, _, _ = data()
    with torch.no_grad():
        got = model(q, k, v, lr)
    want = delta_rule(q, k, v, lr)
    assert got.dtype == torch.float64 and want.abs().max() > 0.1
    assert err(got, want) <= TOL
    # a gamma and a decay of exactly one change nothing
    ones = specc.load(spec(F64 + ", lr: 'f64[B, T]'", "y = omega_memory(q, k, v, lr, gamma=1.0, decay=1.0)"))
    with torch.no_grad():
        assert torch.equal(ones(q, k, v, lr), got)


@pytest.mark.parametrize("window", [2, 3, STEPS + 2])
def test_window_is_one_gradient_step_on_the_window_loss(window):
    text = spec(F64 + ", lr: 'f64[B, T]', g: 'f64[B, T]', a: 'f64[B, T]'",
                f"y = omega_memory(q, k, v, lr, gamma=g, decay=a, window={window})")
    model = specc.load(text)
    q, k, v, lr, gamma, decay = data(window)
    with torch.no_grad():
        got = model(q, k, v, lr, gamma, decay)
    want = omega_autograd(q, k, v, lr, gamma, decay, window)
    assert err(want, omega_closed_form(q, k, v, lr, gamma, decay, window)) <= TOL
    assert err(got, want) <= TOL
    # the window matters: the same inputs with window 1 differ
    assert err(omega_closed_form(q, k, v, lr, gamma, decay, 1), want) > 1e-3


def test_leading_dimensions_are_independent_memories():
    text = spec("q: 'f64[B, H, T, dk]', k: 'f64[B, H, T, dk]', v: 'f64[B, H, T, dv]', lr: 'f64[B, H, T]'",
                "y = omega_memory(q, k, v, lr, window=2)", dims=f"B: 2, H: 3, T: {STEPS}")
    model = specc.load(text)
    q, k, v, lr, gamma, decay = data(5, heads=(3,))
    with torch.no_grad():
        got = model(q, k, v, lr)
    ones = torch.ones_like(lr[:, 0])
    for h in range(3):
        assert err(got[:, h], omega_closed_form(q[:, h], k[:, h], v[:, h], lr[:, h], ones, ones, 2)) <= TOL


def test_numbers_and_scalar_inputs_as_step_size():
    q, k, v, lr, _, _ = data(7)
    with torch.no_grad():
        want = delta_rule(q, k, v, torch.full_like(lr, 0.25))
        num = specc.load(spec(F64, "y = omega_memory(q, k, v, 0.25)"))
        assert err(num(q, k, v), want) <= TOL
        scalar = specc.load(spec(F64 + ", eta: 'f64[]'", "y = omega_memory(q, k, v, eta)"))
        assert err(scalar(q, k, v, torch.tensor(0.25, dtype=torch.float64)), want) <= TOL
        # an f32 model converted with .double() runs the recurrence in float64
        f32 = specc.load(spec("q: 'f32[B, T, dk]', k: 'f32[B, T, dk]', v: 'f32[B, T, dv]'",
                              "y = omega_memory(q, k, v, 0.25, window=2)")).double()
        y = f32(q, k, v)
        ones = torch.ones_like(lr)
        assert y.dtype == torch.float64
        assert err(y, omega_closed_form(q, k, v, 0.25 * ones, ones, ones, 2)) <= TOL


@pytest.mark.parametrize("window", [1, 3])
def test_output_at_t_does_not_depend_on_later_tokens(window):
    text = spec(F64 + ", lr: 'f64[B, T]'", f"y = omega_memory(q, k, v, lr, window={window})")
    model = specc.load(text)
    q, k, v, lr, _, _ = data(3)
    with torch.no_grad():
        base = model(q, k, v, lr)
        for t in range(STEPS):
            changed = [x.clone() for x in (q, k, v, lr)]
            for x in changed:
                x[:, t:] += 1.0
            y = model(*changed)
            assert torch.equal(y[:, :t], base[:, :t]), t
            assert (y[:, t] - base[:, t]).abs().max() > 1e-6, t


def test_gradients_flow_through_the_recurrence():
    text = spec(F64 + ", lr: 'f64[B, T]', g: 'f64[B, T]', a: 'f64[B, T]'",
                "y = omega_memory(q, k, v, lr, gamma=g, decay=a, window=2)", dims="B: 1, T: 4")
    model = specc.load(text)
    args = [x.clone().requires_grad_(True) for x in data(11, b=1, steps=4)]
    assert torch.autograd.gradcheck(lambda *xs: model(*xs), args)


def test_shapes_and_located_errors():
    assert str(specc.check(spec(F64 + ", lr: 'f64[B, T]'", "y = omega_memory(q, k, v, lr, window=3)"))
               .outputs[0].type) == "f64[B, T, 2]"
    lr = F64 + ", lr: 'f64[B, T]'"
    assert_error(spec(F64 + ", lr: 'f64[B]'", "y = omega_memory(q, k, v, lr)"), 7, 29,
                 "omega_memory: lr must be a float number or one value per token, f64[B, T] (q's shape without "
                 "its last dimension), got f64[B]")
    assert_error(spec(lr + ", g: 'f32[B, T]'", "y = omega_memory(q, k, v, lr, gamma=g)"), 7, 33,
                 "omega_memory: gamma f32[B, T] must have the dtype of q f64[B, T, 3]")
    assert_error(spec("q: 'f64[B, T, dk]', k: 'f64[B, T, dv]', v: 'f64[B, T, dv]', lr: 'f64[B, T]'",
                      "y = omega_memory(q, k, v, lr)"), 7, 23,
                 "omega_memory: keys k f64[B, T, 2] must have the shape and dtype of the queries q f64[B, T, 3]")
    assert_error(spec("q: 'f64[B, T, dk]', k: 'f64[B, T, dk]', v: 'f64[B, dv]', lr: 'f64[B, T]'",
                      "y = omega_memory(q, k, v, lr)"), 7, 26,
                 "omega_memory: values v f64[B, 2] must have the dtype and the leading dimensions [B, T] of q "
                 "f64[B, T, 3]")
    assert_error(spec(lr, "y = omega_memory(q, k, v, lr, window=0)"), 7, 33,
                 "omega_memory: window must be from 1 to 4096 tokens, got 0")
    assert_error(spec("q: 'i64[B, T, dk]', k: 'f64[B, T, dk]', v: 'f64[B, T, dv]'",
                      "y = omega_memory(q, k, v, 0.5)"), 7, 20,
                 "omega_memory: expected a floating-point tensor for 'q', got i64[B, T, 3]")
    assert_error(spec("q: 'f64[B, T, T]', k: 'f64[B, T, T]', v: 'f64[B, T, dv]'",
                      "y = omega_memory(q, k, v, 0.5)"), 7, 20,
                 "omega_memory: the key width of q (its last dimension) must be a fixed size, but it is the "
                 "symbolic dimension T")


def test_flops_count_every_step_of_the_window():
    text = spec(F64, "y = omega_memory(q, k, v, 0.5, window=3)")
    for b in (2, 5):
        assert flops_of(text, "omega_memory", B=b) == b * STEPS * (4 * 3 * DK * DV + 2 * 3 * DV + 5 * DK * DV)
