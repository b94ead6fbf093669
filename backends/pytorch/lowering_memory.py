"""PyTorch lowerings of the test-time memory operators (compiler/ops_memory.py).

omega_memory reads `omega_rule(q, k, v, lr, gamma=..., decay=..., window=c)` in generated code; the
function is a helper written into model.py (so the module stays standalone): a loop over the steps,
each one gradient step of the memory on its window, differentiable by autograd. Every value it makes
takes the dtype of q, so a `.double()` model runs the recurrence in float64. The MLP memory
(memory="mlp") passes its initial weights, held by a `Parameters` module, as `w1=`, `w2=`.
"""

from __future__ import annotations

from .lowering import Ctx, Expr, InTypes, Lowering, call, lit


def _omega_memory(c: Ctx, xs: list[Expr]) -> Expr:
    parts = [x.text for x in xs[:4]]
    i = 4
    for option in ("gamma", "decay"):
        if c.a(f"{option}?"):
            parts.append(f"{option}={xs[i].text}")
            i += 1
    if c.a("window") != 1:
        parts.append(f"window={c.a('window')}")
    if c.a("memory") == "mlp":
        parts += [f"w1={c.module}.weight1", f"w2={c.module}.weight2"]
        if not c.a("residual"):
            parts.append("residual=False")
    return call(f"omega_rule({', '.join(parts)})")


def _omega_init(c: Ctx, ins: InTypes) -> str:
    """The MLP memory's initial weights (the linear memory has no parameters)."""
    return "Parameters(" + ", ".join(f"{p.name}={lit(tuple(p.shape))}" for p in c.node.params) + ")"


LOWERINGS: dict[str, Lowering] = {
    "omega_memory": Lowering(_omega_memory, _omega_init, helpers=("omega_rule", "Parameters")),
}

HELPERS: dict[str, str] = {
    "omega_rule": '''
def omega_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr, gamma=None, decay=None,
               window: int = 1, w1: torch.Tensor | None = None, w2: torch.Tensor | None = None,
               residual: bool = True) -> torch.Tensor:
    """ATLAS's Omega rule with a linear memory M (..., dv, dk), M_0 = 0. Step t takes one gradient step
    on 1/2 sum_{i=t-window+1..t} gamma_i ||M k_i - v_i||^2 and reads the memory with q_t:
        M_t = decay_t * M_{t-1} - lr_t * sum_i gamma_i (M_{t-1} k_i - v_i) k_i^T,   y_t = M_t q_t.
    q, k (..., T, dk), v (..., T, dv); lr, gamma, decay numbers or (..., T); gamma and decay default to 1.
    Returns y (..., T, dv). window=1 with gamma = decay = 1 is the delta rule.

    With w1 (heads..., hidden, dk) and w2 (heads..., dv, hidden), the initial weights, the memory is the MLP
    M(x) = x + W2 silu(W1 x) (residual=False: without x); both weights take the step of the same loss,
    W_t = decay_t * W_{t-1} - lr_t * grad_W, and y_t = M_t(q_t)."""
    steps, c = q.shape[-2], window

    def per_step(a):  # (..., T) in q's dtype
        return torch.as_tensor(a, dtype=q.dtype, device=q.device).expand(q.shape[:-1])

    def windows(x):  # (..., T, w) -> (..., T, w, c): the c rows up to each step, zeros before the first
        return F.pad(x, (0, 0, c - 1, 0)).unfold(-2, c, 1)

    lr = per_step(lr)
    gamma = F.pad(per_step(1.0 if gamma is None else gamma), (c - 1, 0)).unfold(-1, c, 1)  # (..., T, c)
    decay = None if decay is None else per_step(decay)
    kw, vw = windows(k), windows(v)  # (..., T, dk, c), (..., T, dv, c); padded tokens have gamma 0
    if not steps:  # no steps
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    # each step's slices, taken once: indexing the whole tensor at every step would make its backward
    # write a zero tensor of the whole size per step (T^2 work); unbind's backward is one stack
    kws, vws, gs, lrs, qs = kw.unbind(-3), vw.unbind(-3), gamma.unbind(-2), lr.unbind(-1), q.unbind(-2)
    decays = None if decay is None else decay.unbind(-1)
    ys = []
    if w1 is None:
        m = q.new_zeros(*q.shape[:-2], v.shape[-1], k.shape[-1])  # (..., dv, dk)
        for t in range(steps):
            keys = kws[t]  # (..., dk, c)
            err = (m @ keys - vws[t]) * gs[t][..., None, :]  # (..., dv, c)
            grad = err @ keys.transpose(-1, -2)  # (..., dv, dk)
            m = (m if decays is None else decays[t][..., None, None] * m) - lrs[t][..., None, None] * grad
            ys.append(m @ qs[t][..., :, None])  # (..., dv, 1)
        return torch.cat(ys, dim=-1).transpose(-1, -2)  # (..., T, dv)
    lead = q.shape[:-2]
    a1 = w1.to(q.dtype).expand(*lead, *w1.shape[-2:])  # (..., hidden, dk)
    a2 = w2.to(q.dtype).expand(*lead, *w2.shape[-2:])  # (..., dv, hidden)
    for t in range(steps):
        keys = kws[t]  # (..., dk, c)
        z = a1 @ keys  # (..., hidden, c)
        s = torch.sigmoid(z)
        act = z * s  # silu
        pred = a2 @ act + (keys if residual else 0.0)  # (..., dv, c)
        err = (pred - vws[t]) * gs[t][..., None, :]
        back = (a2.transpose(-1, -2) @ err) * (s + z * s * (1 - s))  # (..., hidden, c): times silu'(z)
        g2 = err @ act.transpose(-1, -2)  # (..., dv, hidden)
        g1 = back @ keys.transpose(-1, -2)  # (..., hidden, dk)
        if decays is not None:
            a1, a2 = decays[t][..., None, None] * a1, decays[t][..., None, None] * a2
        a1, a2 = a1 - lrs[t][..., None, None] * g1, a2 - lrs[t][..., None, None] * g2
        qt = qs[t][..., :, None]  # (..., dk, 1)
        ys.append(a2 @ F.silu(a1 @ qt) + (qt if residual else 0.0))  # (..., dv, 1)
    return torch.cat(ys, dim=-1).transpose(-1, -2)  # (..., T, dv)
''',
}
