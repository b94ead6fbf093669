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


# ---------------------------------------------------------------------------------------------
# memory="mlp": ATLAS's deep memory M(x) = x + W2 silu(W1 x), both weights trained by the window loss
# ---------------------------------------------------------------------------------------------

HID, HEADS = 4, 2
MLP_INPUTS = ("q: 'f64[B, 2, T, dk]', k: 'f64[B, 2, T, dk]', v: 'f64[B, 2, T, {dv}]', lr: 'f64[B, 2, T]', "
              "g: 'f64[B, 2, T]', a: 'f64[B, 2, T]'")


def mlp_spec(window, residual=True, extra=""):
    dv = "dk" if residual else "dv"
    call = f"y = omega_memory(q, k, v, lr, gamma=g, decay=a, window={window}, memory='mlp', hidden={HID}{extra}"
    return spec(MLP_INPUTS.format(dv=dv), call + ("" if residual else ", residual=false") + ")",
                dims=f"B: 2, T: {STEPS}")


def mlp_data(seed, residual=True, steps=STEPS):
    q, k, v, lr, gamma, decay = data(seed, heads=(HEADS,), steps=steps)
    if residual:  # values of the key width
        v = torch.randn(*v.shape[:-1], DK, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return q, k, v, lr, gamma, decay


def mlp_weights(model, seed=0, scale=1.0):
    """Random initial weights (of a larger scale than the default initialiser), put into the model."""
    gen = torch.Generator().manual_seed(seed)
    w = {n: scale * torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.state_dict().items()}
    model.load_state_dict(w)
    return w["y.weight1"], w["y.weight2"]


def mlp_memory(w1, w2, x, residual):
    return (x if residual else 0.0) + w2 @ torch.nn.functional.silu(w1 @ x)


def omega_mlp_autograd(q, k, v, lr, gamma, decay, window, w1, w2, residual=True, check=True):
    """The deep memory as the paper states it, one memory per (batch row, head): W_t = decay_t W_{t-1} -
    lr_t * grad_W 1/2 sum_{i=t-c+1..t} gamma_i ||M(k_i) - v_i||^2 at W_{t-1}, for W = W1 and W2, the
    gradients by torch.autograd.grad; y_t = M_t(q_t). With check=True each step's gradients are also
    compared with the closed form the kernels use (<= 1e-12)."""
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            a1, a2 = w1[h].clone(), w2[h].clone()
            for t in range(q.shape[2]):
                p1, p2 = a1.detach().requires_grad_(True), a2.detach().requires_grad_(True)
                span = range(max(0, t - window + 1), t + 1)
                loss = sum(0.5 * gamma[b, h, i] * ((mlp_memory(p1, p2, k[b, h, i], residual) - v[b, h, i]) ** 2).sum()
                           for i in span)
                g1, g2 = torch.autograd.grad(loss, (p1, p2))
                if check:  # the closed form: e_i = gamma_i (M(k_i) - v_i), grad W2 = sum e_i silu(z_i)^T,
                    # grad W1 = sum ((W2^T e_i) * silu'(z_i)) k_i^T
                    c1, c2 = torch.zeros_like(a1), torch.zeros_like(a2)
                    for i in span:
                        z = a1 @ k[b, h, i]
                        s = torch.sigmoid(z)
                        e = gamma[b, h, i] * (mlp_memory(a1, a2, k[b, h, i], residual) - v[b, h, i])
                        c2 += torch.outer(e, z * s)
                        c1 += torch.outer((a2.T @ e) * (s + z * s * (1 - s)), k[b, h, i])
                    assert err(c1, g1) <= TOL and err(c2, g2) <= TOL
                a1, a2 = decay[b, h, t] * a1 - lr[b, h, t] * g1, decay[b, h, t] * a2 - lr[b, h, t] * g2
                out[b, h, t] = mlp_memory(a1, a2, q[b, h, t], residual)
    return out


@pytest.mark.parametrize("window, residual", [(1, True), (3, True), (2, False), (STEPS + 2, True)])
def test_mlp_memory_is_one_autograd_step_of_both_weights_per_token(window, residual):
    model = specc.load(mlp_spec(window, residual))
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == \
        [("y.weight1", (HEADS, HID, DK)), ("y.weight2", (HEADS, DK if residual else DV, HID))]
    w1, w2 = mlp_weights(model, window)
    xs = mlp_data(window, residual)
    with torch.no_grad():
        got = model(*xs)
    want = omega_mlp_autograd(*xs, window, w1, w2, residual)
    assert got.dtype == torch.float64 and want.abs().max() > 0.1
    assert err(got, want) <= 1e-10
    # the memory learns: without the updates (lr = 0) the outputs differ, and so do other windows
    static = omega_mlp_autograd(*xs[:3], 0 * xs[3], *xs[4:], window, w1, w2, residual, check=False)
    assert err(static, want) > 1e-3
    other = omega_mlp_autograd(*xs, 1 if window > 1 else 3, w1, w2, residual, check=False)
    assert err(other, want) > 1e-3


def test_mlp_memory_without_steps_is_the_static_mlp_of_its_initial_weights():
    """lr = 0: no gradient step, so W_t = (decay_1 ... decay_t) W_0 and y_t = M_t(q_t) is a fixed
    2-layer MLP of the learned initial weights (scaled by the forget gates), computed here directly."""
    model = specc.load(mlp_spec(3))
    w1, w2 = mlp_weights(model, 4)
    q, k, v, lr, gamma, decay = mlp_data(4)
    with torch.no_grad():
        got = model(q, k, v, 0 * lr, gamma, decay)
    scale = torch.cumprod(decay, dim=-1)[..., None, None]  # (B, H, T, 1, 1)
    hidden = torch.nn.functional.silu((scale * w1[None, :, None]) @ q[..., None])  # (B, H, T, hidden, 1)
    want = q + ((scale * w2[None, :, None]) @ hidden)[..., 0]
    assert err(got, want) <= TOL
    assert err(want, q) > 0.1  # the MLP's part is there


def test_zero_initial_weights_are_a_fixed_point():
    """W1_0 = W2_0 = 0: silu(0) = 0 and W2 = 0 make both gradients zero, so the memory never moves and
    y_t = q_t (the residual) whatever the keys, values and step sizes: why the initial weights are learned
    from a non-zero start."""
    model = specc.load(mlp_spec(2))
    model.load_state_dict({n: torch.zeros_like(p) for n, p in model.state_dict().items()})
    q, k, v, lr, gamma, decay = mlp_data(6)
    with torch.no_grad():
        assert torch.equal(model(q, k, v, lr, gamma, decay), q)


def test_mlp_memory_heads_start_from_their_own_weights():
    model = specc.load(mlp_spec(2))
    w1, w2 = mlp_weights(model, 8)
    xs = mlp_data(8)
    with torch.no_grad():
        base = model(*xs)
        sd = model.state_dict()
        sd["y.weight1"][1] += 0.5  # head 1 only
        model.load_state_dict(sd)
        moved = model(*xs)
    assert torch.equal(moved[:, 0], base[:, 0]) and (moved[:, 1] - base[:, 1]).abs().max() > 1e-3


def test_mlp_memory_gradients_reach_the_initial_weights_and_inputs():
    model = specc.load(spec(MLP_INPUTS.format(dv="dk"),
                            "y = omega_memory(q, k, v, lr, gamma=g, decay=a, window=2, memory='mlp', hidden=3)",
                            dims="B: 1, T: 3"))
    names = [n for n, _ in model.named_parameters()]
    mlp_weights(model, 9, scale=0.5)
    xs = [x[:1].clone().requires_grad_(True) for x in mlp_data(9, steps=3)]  # one batch row
    ws = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    fn = lambda *a: torch.func.functional_call(model, dict(zip(names, a[:2])), tuple(a[2:]))  # noqa: E731
    assert torch.autograd.gradcheck(fn, ws + xs)


def test_mlp_memory_located_errors_and_flops():
    inputs = MLP_INPUTS.format(dv="dv")
    assert_error(spec(inputs, "y = omega_memory(q, k, v, lr, memory='mlp')"), 7, 7,
                 "omega_memory: memory='mlp' needs hidden=H, the MLP's hidden width (a positive integer), got 0")
    assert_error(spec(inputs, "y = omega_memory(q, k, v, lr, memory='mlp', hidden=4)"), 7, 7,
                 "omega_memory: the residual memory M(x) = x + W2 silu(W1 x) needs keys and values of one width, "
                 "got 3 and 2; residual=false gives M(x) = W2 silu(W1 x)")
    assert_error(spec(inputs, "y = omega_memory(q, k, v, lr, memory='deep', hidden=4)"), 7, 33,
                 "omega_memory(): argument 'memory' must be one of 'linear', 'mlp', got 'deep'")
    assert_error(spec(F64, "y = omega_memory(q[0], k[0], v[0], 0.5, memory='mlp', hidden=2, residual=false)"), 7, 20,
                 "omega_memory: memory='mlp' needs q of rank 3 or more, [batch, heads..., T, dk] (one initial memory "
                 "per head), got f64[T, 3]")
    assert_error(spec("q: 'f64[B, H, T, dk]', k: 'f64[B, H, T, dk]', v: 'f64[B, H, T, dk]'",
                      "y = omega_memory(q, k, v, 0.5, memory='mlp', hidden=2)", dims="B: 2, H: 2, T: 3"), 7, 20,
                 "omega_memory: parameter 'weight1' would have symbolic size H; its size must be fixed by params, "
                 "not by a symbolic dimension")
    # hidden and residual are the MLP's options: the linear memory takes and ignores them (a spec switches
    # memories by a param without touching the rest of the call)
    lin = specc.check(spec(inputs, "y = omega_memory(q, k, v, lr, hidden=4)"))
    assert lin.params == 0
    s = specc.check(mlp_spec(3))
    assert s.params == HEADS * 2 * HID * DK
    w, h, dk, dv = 3, HID, DK, DK
    per_step = w * (4 * h * dk + 6 * dv * h + 9 * h + 3 * dv) + 5 * h * dk + 5 * dv * h + 4 * h + dv
    assert s.flops_by_op["omega_memory"] == 2 * HEADS * STEPS * per_step
    r = flops_of(mlp_spec(2, residual=False), "omega_memory", B=3)
    w, dv = 2, DV
    assert r == 3 * HEADS * STEPS * (w * (4 * h * dk + 6 * dv * h + 9 * h + 2 * dv) + 5 * h * dk + 5 * dv * h + 4 * h)
