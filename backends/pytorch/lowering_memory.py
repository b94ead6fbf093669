"""PyTorch lowerings of the test-time memory operators (compiler/ops_memory.py).

omega_memory reads `omega_rule(q, k, v, lr, gamma=..., decay=..., window=c)` in generated code; the
function is a helper written into model.py (so the module stays standalone): a loop over the steps,
each one gradient step of the memory on its window, differentiable by autograd. Every value it makes
takes the dtype of q, so a `.double()` model runs the recurrence in float64.
"""

from __future__ import annotations

from .lowering import Ctx, Expr, Lowering, call


def _omega_memory(c: Ctx, xs: list[Expr]) -> Expr:
    parts = [x.text for x in xs[:4]]
    i = 4
    for option in ("gamma", "decay"):
        if c.a(f"{option}?"):
            parts.append(f"{option}={xs[i].text}")
            i += 1
    if c.a("window") != 1:
        parts.append(f"window={c.a('window')}")
    return call(f"omega_rule({', '.join(parts)})")


LOWERINGS: dict[str, Lowering] = {
    "omega_memory": Lowering(_omega_memory, helpers=("omega_rule",)),
}

HELPERS: dict[str, str] = {
    "omega_rule": '''
def omega_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr, gamma=None, decay=None,
               window: int = 1) -> torch.Tensor:
    """ATLAS's Omega rule with a linear memory M (..., dv, dk), M_0 = 0. Step t takes one gradient step
    on 1/2 sum_{i=t-window+1..t} gamma_i ||M k_i - v_i||^2 and reads the memory with q_t:
        M_t = decay_t * M_{t-1} - lr_t * sum_i gamma_i (M_{t-1} k_i - v_i) k_i^T,   y_t = M_t q_t.
    q, k (..., T, dk), v (..., T, dv); lr, gamma, decay numbers or (..., T); gamma and decay default to 1.
    Returns y (..., T, dv). window=1 with gamma = decay = 1 is the delta rule."""
    steps, c = q.shape[-2], window

    def per_step(a):  # (..., T) in q's dtype
        return torch.as_tensor(a, dtype=q.dtype, device=q.device).expand(q.shape[:-1])

    def windows(x):  # (..., T, w) -> (..., T, w, c): the c rows up to each step, zeros before the first
        return F.pad(x, (0, 0, c - 1, 0)).unfold(-2, c, 1)

    lr = per_step(lr)
    gamma = F.pad(per_step(1.0 if gamma is None else gamma), (c - 1, 0)).unfold(-1, c, 1)  # (..., T, c)
    decay = None if decay is None else per_step(decay)
    kw, vw = windows(k), windows(v)  # (..., T, dk, c), (..., T, dv, c); padded keys add nothing
    m = q.new_zeros(*q.shape[:-2], v.shape[-1], k.shape[-1])  # (..., dv, dk)
    ys = []
    for t in range(steps):
        keys = kw[..., t, :, :]
        err = (m @ keys - vw[..., t, :, :]) * gamma[..., t, None, :]  # (..., dv, c)
        grad = err @ keys.transpose(-1, -2)  # (..., dv, dk)
        m = (m if decay is None else decay[..., t, None, None] * m) - lr[..., t, None, None] * grad
        ys.append(m @ q[..., t, :, None])  # (..., dv, 1)
    if not ys:  # no steps
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    return torch.cat(ys, dim=-1).transpose(-1, -2)  # (..., T, dv)
''',
}
