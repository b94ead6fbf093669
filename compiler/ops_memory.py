"""Test-time memory operators: a memory updated inside the forward pass, token by token.

omega_memory is the Omega rule of ATLAS (Behrouz et al., 2025; SEEDS.md row 19) with a linear
memory M [dv, dk] per batch row (and head: any leading dimensions), starting from M_0 = 0. At each
step t = 1..T it takes one gradient step on the window loss

    L_t(M) = 1/2 * sum_{i = t-c+1 .. t, i >= 1} gamma_i * ||M k_i - v_i||^2,

    M_t = decay_t * M_{t-1} - lr_t * grad L_t(M_{t-1})
        = decay_t * M_{t-1} - lr_t * sum_i gamma_i (M_{t-1} k_i - v_i) k_i^T,

and reads y_t = M_t q_t (after the update: token t is already memorised). c is `window`; lr (eta_t),
gamma (gamma_i, the weight of token i in every window that holds it) and decay (alpha_t, a forget
gate) are numbers or one value per token. With window=1, gamma = decay = 1 this is the delta rule
M_t = M_{t-1} - eta_t (M_{t-1} k_t - v_t) k_t^T. A feature map (the paper's polynomial phi) is
applied by the spec to q and k before the call, so dk is the width of phi's features.

memory="mlp" (ATLAS's deep memory) replaces M by a 2-layer MLP per leading row,

    M(x) = x + W2 silu(W1 x)        (residual=false: M(x) = W2 silu(W1 x); the residual needs dk = dv),

W1 [hidden, dk], W2 [dv, hidden]. Each step takes the same gradient step on both weights, from the
weights of the previous step,

    W_t = decay_t * W_{t-1} - lr_t * grad_W 1/2 sum_i gamma_i ||M_{t-1}(k_i) - v_i||^2   (W = W1, W2),

and reads y_t = M_t(q_t). In closed form, with z_i = W1 k_i, e_i = gamma_i (M(k_i) - v_i):
grad_W2 = sum_i e_i silu(z_i)^T, grad_W1 = sum_i ((W2^T e_i) * silu'(z_i)) k_i^T. The initial weights
W1_0, W2_0 are the layer's parameters `weight1` [..., hidden, dk] and `weight2` [..., dv, hidden],
one pair per index of q's dimensions between its first (the batch) and T (the heads): the outer loop
learns them. SiLU is the activation (Titans' and ATLAS's memories use SiLU or GELU; SiLU's
derivative needs no erf in the kernels).

The linear memory is a pure function of its inputs (no parameters, no randomness): passes may compute
two equal calls once, and nothing folds it. The MLP memory is a layer with parameters.
"""

from __future__ import annotations

from .dims import Dim, fmt, product
from .ir import FLOAT_DTYPES, TensorType
from .ops import MAX_PARTS, NUMBER_ARGS, fixed_width, need_float, need_rank, shape_str
from .registry import Arg, OpCall, OpError, op, param, uniform_fan_in

T = TensorType

#: The longest window: the op keeps `window` keys and values per step.
MAX_WINDOW = MAX_PARTS

#: The memories omega_memory can train.
MEMORIES = ("linear", "mlp")


def _per_token(c: OpCall, name: str, q: TensorType) -> None:
    """lr / gamma / decay: a float scalar (a number, or a 0-d tensor) or one value per token, q's shape
    without its last dimension (e.g. [B, heads, T])."""
    t = c.t(name)
    if t is None:
        return
    want = q.shape[:-1]
    if t.dtype not in FLOAT_DTYPES or (t.rank != 0 and t.shape != want):
        raise OpError(f"omega_memory: {name} must be a float number or one value per token, "
                      f"{q.dtype}[{', '.join(fmt(s) for s in want)}] (q's shape without its last dimension), "
                      f"got {shape_str(t)}", name)
    if t.rank and t.dtype != q.dtype:
        raise OpError(f"omega_memory: {name} {shape_str(t)} must have the dtype of q {shape_str(q)}", name)


def _omega_flops(c: OpCall, outs) -> Dim:
    q, v = c.t("q"), c.t("v")
    dk, dv, w = q.shape[-1], v.shape[-1], c.a("window")
    steps = product(q.shape[:-1])  # one memory step per token (and leading row)
    if c.a("memory") == "mlp":
        h, r = c.a("hidden"), int(c.a("residual"))
        # per window token: z = W1 k (2 h dk), silu and its derivative (8 h: 4 each), W2 silu(z) (2 dv h), the
        # residual (r dv), errors minus v and times gamma (2 dv), W2^T e (2 dv h), times silu'(z) (h), the
        # gradients' products e a^T (2 dv h) and d k^T (2 h dk); the update decay * W - lr * G (3 per weight);
        # the read-out W1 q (2 h dk), silu (4 h), W2 a (2 dv h) and the residual (r dv)
        per_token = 4 * h * dk + 6 * dv * h + 9 * h + (2 + r) * dv
        return steps * (w * per_token + 5 * h * dk + 5 * dv * h + 4 * h + r * dv)
    # per step: window predictions M K (2 w dk dv), errors minus v and times gamma (2 w dv), the gradient
    # err K^T (2 w dk dv), the update decay * M - lr * G (3 dk dv), the read-out M q (2 dk dv)
    return steps * (4 * w * dk * dv + 2 * w * dv + 5 * dk * dv)


def _omega_params(c: OpCall):
    """memory="mlp": the initial weights, weight1 [heads..., hidden, dk] and weight2 [heads..., dv, hidden]
    (heads: q's dimensions between the batch and T); the linear memory has none."""
    if c.a("memory") != "mlp":
        return []
    q, v = c.t("q"), c.t("v")
    dk, dv, h = q.shape[-1], v.shape[-1], c.a("hidden")
    heads = tuple(q.shape[1:-2])
    return [param("weight1", heads + (h, dk), uniform_fan_in(dk), op="omega_memory", arg="q"),
            param("weight2", heads + (dv, h), uniform_fan_in(h), op="omega_memory", arg="q")]


@op("omega_memory", Arg("q", "tensor"), Arg("k", "tensor"), Arg("v", "tensor"), Arg("lr", "tensor"),
    Arg("gamma", "tensor?", None), Arg("decay", "tensor?", None), Arg("window", "int", 1),
    Arg("memory", "str", "linear", MEMORIES), Arg("hidden", "int", 0), Arg("residual", "bool", True),
    params=_omega_params, flops=_omega_flops, category="layer")
def _omega_memory(c: OpCall):
    """omega_memory(q, k, v, lr, gamma=none, decay=none, window=1): ATLAS's Omega rule with a linear memory
    M [dv, dk], M_0 = 0, per leading row: for each step t, M_t = decay_t * M_{t-1} - lr_t * sum over the
    last `window` tokens i <= t of gamma_i (M_{t-1} k_i - v_i) k_i^T (one gradient step on
    1/2 sum gamma_i ||M k_i - v_i||^2), and y_t = M_t q_t. q, k [..., T, dk], v [..., T, dv] -> [..., T, dv].
    lr, gamma, decay: numbers or [..., T] (one per token); gamma and decay default to 1. window=1 with
    gamma = decay = 1 is the delta rule. memory="mlp", hidden=H: ATLAS's deep memory M(x) = x + W2 silu(W1 x)
    (residual=false: without x), W1 [H, dk], W2 [dv, H] starting from the parameters weight1, weight2 (one
    pair per head: q's dimensions between the batch and T), both taking the step above; y_t = M_t(q_t).
    hidden and residual apply to the MLP memory only."""
    q, k, v = c.t("q"), c.t("k"), c.t("v")
    for name, t in (("q", q), ("k", k), ("v", v)):
        need_float(t, "omega_memory", name)
        need_rank(t, 2, "omega_memory", name)
    fixed_width(q.shape[-1], "omega_memory", "key width of q (its last dimension)", "q")
    fixed_width(v.shape[-1], "omega_memory", "value width of v (its last dimension)", "v")
    if (k.dtype, k.shape) != (q.dtype, q.shape):
        raise OpError(f"omega_memory: keys k {shape_str(k)} must have the shape and dtype of the queries "
                      f"q {shape_str(q)}", "k")
    if v.dtype != q.dtype or v.shape[:-1] != q.shape[:-1]:
        raise OpError(f"omega_memory: values v {shape_str(v)} must have the dtype and the leading dimensions "
                      f"[{', '.join(fmt(s) for s in q.shape[:-1])}] of q {shape_str(q)}", "v")
    w = c.a("window")
    if not 1 <= w <= MAX_WINDOW:
        raise OpError(f"omega_memory: window must be from 1 to {MAX_WINDOW} tokens, got {w}", "window")
    for name in ("lr", "gamma", "decay"):
        _per_token(c, name, q)
    if c.a("memory") == "mlp":
        if c.a("hidden") < 1:
            raise OpError(f"omega_memory: memory='mlp' needs hidden=H, the MLP's hidden width (a positive "
                          f"integer), got {c.a('hidden')}", "hidden")
        if q.rank < 3:
            raise OpError(f"omega_memory: memory='mlp' needs q of rank 3 or more, [batch, heads..., T, dk] (one "
                          f"initial memory per head), got {shape_str(q)}", "q")
        if c.a("residual") and q.shape[-1] != v.shape[-1]:
            raise OpError(f"omega_memory: the residual memory M(x) = x + W2 silu(W1 x) needs keys and values of "
                          f"one width, got {fmt(q.shape[-1])} and {fmt(v.shape[-1])}; residual=false gives "
                          f"M(x) = W2 silu(W1 x)", "residual")
    return T(q.dtype, q.shape[:-1] + (v.shape[-1],))


NUMBER_ARGS["omega_memory"] = ("lr", "gamma", "decay")  # omega_memory(q, k, v, 0.5): numbers become scalar nodes
