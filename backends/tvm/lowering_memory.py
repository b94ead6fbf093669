"""TVM (Relax) lowering of the test-time memory operators (compiler/ops_memory.py).

omega_memory is a recurrence over the tokens, written as one TIR kernel (as the LSTM's): the leading
dimensions of q, k, v are flattened into rows R (batch x heads), the scalars lr / gamma / decay are
broadcast to one value per token, and the kernel runs one task per (row, memory row j): the memory's
row j, M[j, :] (dk values, in registers or local memory), evolves on its own, since

    M_t[j, :] = decay_t * M_{t-1}[j, :] - lr_t * sum_i gamma_i (M_{t-1}[j, :] . k_i - v_i[j]) k_i,
    y_t[j] = M_t[j, :] . q_t.

CPU: R * dv / J tasks in parallel, each J memory rows side by side in the innermost loops (J the largest
of 16, 8, 4, 2, 1 dividing dv: the vector lanes, with every row's arithmetic in the order of one row
alone); CUDA: a thread block per row, a thread per memory row.

memory="mlp" (ATLAS's deep memory, M(x) = x + W2 silu(W1 x)) couples every weight of a memory through
W2^T e, so its kernel runs one task per row (batch x head), the tokens a serial loop: W1 [hidden, dk]
and W2 [dv, hidden] start from the row's head's initial weights (the layer's parameters) and live in
the task's local memory; each step computes, for the window's tokens, z = W1 k_i, silu(z) and silu'(z),
the errors e_i = gamma_i (M(k_i) - v_i) and W2^T e_i * silu'(z), then updates both weights from their
old values and reads y_t = M_t(q_t). CPU: the rows in parallel, the hidden units in vector lanes (W1
held transposed, [dk, hidden]; each unit's sums in the order of one unit alone); CUDA: a thread block of
one thread per row (the recurrence is serial; the kernel is there to run, not to be fast).
"""

from __future__ import annotations

from tvm import relax, tirx
from tvm.relax import op as R

from .lowering import Ctx, LoweringError, _cast

#: The widest memory row (dk) the kernel keeps in a thread's local memory.
MAX_KEY_WIDTH = 4096


def omega_kernel(dk: int, dv: int, window: int, dtype: str, gpu: bool = False) -> tirx.PrimFunc:
    """The Omega-rule kernel over a symbolic row count R and length L.

    In: q, k [R, L, dk], v [R, L, dv], lr, gamma, decay [R, L]. Out: y [R, L, dv]. M_0 = 0; step t takes
    the window's tokens i = t - window + 1 .. t (i >= 0), with the errors of M_{t-1}, then reads M_t.
    """
    from tvm.script import tirx as T

    C = window
    # memory rows per task, side by side in vector lanes: on the CPU the largest of 16, 8, 4, 2, 1 dividing
    # dv; on CUDA one (a thread per memory row)
    J = 1 if gpu else next(n for n in (16, 8, 4, 2, 1) if dv % n == 0)
    lanes = T.serial if gpu else T.vectorized

    @T.macro
    def memory_rows(q, k, v, lr, gamma, decay, y, L, r, j0):
        """Memory rows j0 .. j0 + J - 1 of row r over every step: M[j, :] in local memory, the window's errors
        first; the J rows side by side in the innermost loops, each row's arithmetic that of the row alone."""
        m = T.decl_buffer((dk, J), dtype, scope="local")
        e = T.decl_buffer((C, J), dtype, scope="local")
        acc = T.decl_buffer((J,), dtype, scope="local")
        for a in range(dk):
            for jj in lanes(J):
                m[a, jj] = T.Cast(dtype, 0)
        for t in range(L):
            for w in range(C):
                for jj in lanes(J):
                    e[w, jj] = T.Cast(dtype, 0)
                if t + w >= C - 1:  # token i = t + w - (C - 1) of the window, if there is one
                    for jj in lanes(J):
                        acc[jj] = T.Cast(dtype, 0)
                    for a in range(dk):
                        for jj in lanes(J):
                            acc[jj] = acc[jj] + m[a, jj] * k[r, t + w - (C - 1), a]
                    for jj in lanes(J):
                        e[w, jj] = (acc[jj] - v[r, t + w - (C - 1), j0 + jj]) * gamma[r, t + w - (C - 1)]
            for jj in lanes(J):
                acc[jj] = T.Cast(dtype, 0)
            for a in range(dk):
                for jj in lanes(J):
                    m[a, jj] = decay[r, t] * m[a, jj]
                for w in range(C):
                    if t + w >= C - 1:
                        for jj in lanes(J):
                            m[a, jj] = m[a, jj] - lr[r, t] * e[w, jj] * k[r, t + w - (C - 1), a]
                for jj in lanes(J):
                    acc[jj] = acc[jj] + m[a, jj] * q[r, t, a]
            for jj in lanes(J):
                y[r, t, j0 + jj] = acc[jj]

    @T.prim_func(private=True)
    def omega_scan(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_lr: T.handle, var_g: T.handle,
                   var_d: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        Rn = T.int64()
        L = T.int64()
        q = T.match_buffer(var_q, (Rn, L, dk), dtype)
        k = T.match_buffer(var_k, (Rn, L, dk), dtype)
        v = T.match_buffer(var_v, (Rn, L, dv), dtype)
        lr = T.match_buffer(var_lr, (Rn, L), dtype)
        gamma = T.match_buffer(var_g, (Rn, L), dtype)
        decay = T.match_buffer(var_d, (Rn, L), dtype)
        y = T.match_buffer(var_y, (Rn, L, dv), dtype)
        if gpu:  # a Python constant: one loop nest or the other
            for r in T.thread_binding(Rn, thread="blockIdx.x"):
                for j in T.thread_binding(dv, thread="threadIdx.x"):
                    memory_rows(q, k, v, lr, gamma, decay, y, L, r, j)
        else:
            for task in T.parallel(Rn * (dv // J)):
                memory_rows(q, k, v, lr, gamma, decay, y, L, task // (dv // J), task % (dv // J) * J)

    return omega_scan


#: The most values (hidden * (dk + dv + 3 * window) + dv * window) the MLP kernel keeps in a task's local memory.
MAX_MLP_STATE = 1 << 20


def omega_mlp_kernel(dk: int, dv: int, hidden: int, window: int, residual: bool, dtype: str,
                     gpu: bool = False) -> tirx.PrimFunc:
    """The Omega-rule kernel of the MLP memory over a symbolic row count R, length L and head count H.

    In: q, k [R, L, dk], v [R, L, dv], lr, gamma, decay [R, L], the initial weights w1 [H, hidden, dk],
    w2 [H, dv, hidden] (row r is of head r % H). Out: y [R, L, dv]. Step t takes the window's tokens
    i = t - window + 1 .. t (i >= 0) with the weights of step t - 1, updates both, then reads M_t(q_t).
    """
    from tvm.script import tirx as T

    C, Hd = window, hidden
    # CPU: the hidden units in vector lanes of A (the largest of 16, 8, 4, 2, 1 dividing hidden), each unit's
    # sums in the order of one unit alone; CUDA: A = 1 (the kernel is there to run, not to be fast)
    A = 1 if gpu else next(n for n in (16, 8, 4, 2, 1) if Hd % n == 0)
    G = Hd // A

    @T.macro
    def memory(q, k, v, lr, gamma, decay, w1, w2, y, L, r, head):
        """Row r over every step: its weights in local memory (W1 transposed, [dk, hidden], so that the
        hidden units lie side by side); per window slot w the token t + w - (C - 1)."""
        m1 = T.decl_buffer((dk, Hd), dtype, scope="local")
        m2 = T.decl_buffer((dv, Hd), dtype, scope="local")
        act = T.decl_buffer((C, Hd), dtype, scope="local")  # silu(z) of each window token
        back = T.decl_buffer((C, Hd), dtype, scope="local")  # silu'(z), then (W2^T e) * silu'(z)
        e = T.decl_buffer((C, dv), dtype, scope="local")  # gamma_i (M(k_i) - v_i)
        z = T.decl_buffer((Hd,), dtype, scope="local")  # W1 x, then W2^T e
        zq = T.decl_buffer((Hd,), dtype, scope="local")
        acc = T.decl_buffer((1,), dtype, scope="local")
        for b, g in T.grid(dk, G):
            for l in T.vectorized(A):
                m1[b, g * A + l] = w1[head, g * A + l, b]
        for j, g in T.grid(dv, G):
            for l in T.vectorized(A):
                m2[j, g * A + l] = w2[head, j, g * A + l]
        for t in range(L):
            for w in range(C):
                if t + w >= C - 1:  # the slot holds a token
                    for g in range(G):
                        for l in T.vectorized(A):
                            z[g * A + l] = T.Cast(dtype, 0)
                    for b, g in T.grid(dk, G):
                        for l in T.vectorized(A):
                            z[g * A + l] = z[g * A + l] + m1[b, g * A + l] * k[r, t + w - (C - 1), b]
                    for g in range(G):
                        for l in T.vectorized(A):
                            act[w, g * A + l] = z[g * A + l] * T.sigmoid(z[g * A + l])
                    for g in range(G):
                        for l in T.vectorized(A):
                            back[w, g * A + l] = T.sigmoid(z[g * A + l]) * (
                                T.Cast(dtype, 1) + z[g * A + l] * (T.Cast(dtype, 1) - T.sigmoid(z[g * A + l])))
                    for j in range(dv):
                        if residual:  # a Python constant
                            acc[0] = k[r, t + w - (C - 1), j]
                        else:
                            acc[0] = T.Cast(dtype, 0)
                        for a in range(Hd):
                            acc[0] = acc[0] + m2[j, a] * act[w, a]
                        e[w, j] = (acc[0] - v[r, t + w - (C - 1), j]) * gamma[r, t + w - (C - 1)]
                    for g in range(G):
                        for l in T.vectorized(A):
                            z[g * A + l] = T.Cast(dtype, 0)
                    for j, g in T.grid(dv, G):
                        for l in T.vectorized(A):
                            z[g * A + l] = z[g * A + l] + m2[j, g * A + l] * e[w, j]
                    for g in range(G):
                        for l in T.vectorized(A):
                            back[w, g * A + l] = back[w, g * A + l] * z[g * A + l]
            for j, g in T.grid(dv, G):
                for l in T.vectorized(A):
                    m2[j, g * A + l] = decay[r, t] * m2[j, g * A + l]
            for w in range(C):
                if t + w >= C - 1:
                    for j, g in T.grid(dv, G):
                        for l in T.vectorized(A):
                            m2[j, g * A + l] = m2[j, g * A + l] - lr[r, t] * e[w, j] * act[w, g * A + l]
            for b, g in T.grid(dk, G):
                for l in T.vectorized(A):
                    m1[b, g * A + l] = decay[r, t] * m1[b, g * A + l]
            for w in range(C):
                if t + w >= C - 1:
                    for b, g in T.grid(dk, G):
                        for l in T.vectorized(A):
                            m1[b, g * A + l] = m1[b, g * A + l] - lr[r, t] * back[w, g * A + l] * \
                                k[r, t + w - (C - 1), b]
            for g in range(G):
                for l in T.vectorized(A):
                    z[g * A + l] = T.Cast(dtype, 0)
            for b, g in T.grid(dk, G):
                for l in T.vectorized(A):
                    z[g * A + l] = z[g * A + l] + m1[b, g * A + l] * q[r, t, b]
            for g in range(G):
                for l in T.vectorized(A):
                    zq[g * A + l] = z[g * A + l] * T.sigmoid(z[g * A + l])
            for j in range(dv):
                if residual:
                    acc[0] = q[r, t, j]
                else:
                    acc[0] = T.Cast(dtype, 0)
                for a in range(Hd):
                    acc[0] = acc[0] + m2[j, a] * zq[a]
                y[r, t, j] = acc[0]

    @T.prim_func(private=True)
    def omega_mlp_scan(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_lr: T.handle, var_g: T.handle,
                       var_d: T.handle, var_w1: T.handle, var_w2: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        Rn = T.int64()
        L = T.int64()
        H = T.int64()
        q = T.match_buffer(var_q, (Rn, L, dk), dtype)
        k = T.match_buffer(var_k, (Rn, L, dk), dtype)
        v = T.match_buffer(var_v, (Rn, L, dv), dtype)
        lr = T.match_buffer(var_lr, (Rn, L), dtype)
        gamma = T.match_buffer(var_g, (Rn, L), dtype)
        decay = T.match_buffer(var_d, (Rn, L), dtype)
        w1 = T.match_buffer(var_w1, (H, Hd, dk), dtype)
        w2 = T.match_buffer(var_w2, (H, dv, Hd), dtype)
        y = T.match_buffer(var_y, (Rn, L, dv), dtype)
        if gpu:  # a Python constant: one loop nest or the other
            for r in T.thread_binding(Rn, thread="blockIdx.x"):
                for one in T.thread_binding(1, thread="threadIdx.x"):
                    memory(q, k, v, lr, gamma, decay, w1, w2, y, L, r + one, (r + one) % H)
        else:
            for r in T.parallel(Rn):
                memory(q, k, v, lr, gamma, decay, w1, w2, y, L, r, r % H)

    return omega_mlp_scan


def _omega_memory(c: Ctx, xs: list) -> relax.Expr:
    if c.target_kind not in ("llvm", "cuda"):
        raise LoweringError(f"omega_memory: no recurrence kernel for target {c.target_kind} (llvm and cuda only)")
    qt, vt = c.in_type(0), c.in_type(2)
    dk, dv, window = int(qt.shape[-1]), int(vt.shape[-1]), int(c.a("window"))
    mlp, hidden = c.a("memory") == "mlp", int(c.a("hidden"))
    if mlp and hidden * (dk + dv + 3 * window) + dv * window > MAX_MLP_STATE:
        raise LoweringError(f"omega_memory: the MLP memory's state (hidden {hidden}, key width {dk}, value width "
                            f"{dv}, window {window}) is over the kernel's {MAX_MLP_STATE} values per task")
    if not mlp and dk > MAX_KEY_WIDTH:
        raise LoweringError(f"omega_memory: the key width {dk} is over the kernel's {MAX_KEY_WIDTH}")
    if not mlp and c.target_kind == "cuda" and dv > 1024:
        raise LoweringError(f"omega_memory: the value width {dv} is over CUDA's 1024 threads per block")
    dtype = c.dtype
    lead = c.shape(qt.shape[:-2])
    steps = c.dim(qt.shape[-2])
    rows = tirx.IntImm("int64", 1)
    for d in lead:
        rows = rows * d
    q, k, v = xs[:3]
    given = iter(range(3, len(xs)))
    lr = next(given)
    gamma = next(given) if c.a("gamma?") else None
    decay = next(given) if c.a("decay?") else None

    def per_token(i: int | None, default: float) -> relax.Expr:
        """Input i (a scalar, possibly of another float dtype, or one value per token) as [rows, steps]."""
        if i is None:
            x = c.const(default, dtype)
        elif (node := c.graph.node(c.node.inputs[i].node)).op == "scalar":
            x = c.const(float(node.attr("value")), dtype)  # a number, as written (0.3, not float32's 0.3)
        else:
            x = _cast(c, xs[i], dtype)
        return c.emit(R.reshape(R.broadcast_to(x, lead + [steps]), [rows, steps]))

    if mlp:
        return _omega_mlp(c, xs[:3], [per_token(lr, 0.0), per_token(gamma, 1.0), per_token(decay, 1.0)],
                          lead, rows, steps, dk, dv, hidden, window)
    key = ("omega", dk, dv, window, dtype, c.target_kind)
    if key not in c.kernels:
        c.kernels[key] = c.bb.add_func(omega_kernel(dk, dv, window, dtype, gpu=c.target_kind == "cuda"),
                                       f"omega_scan_k{dk}_v{dv}_w{window}")
    args = [c.emit(R.reshape(q, [rows, steps, dk])), c.emit(R.reshape(k, [rows, steps, dk])),
            c.emit(R.reshape(v, [rows, steps, dv])), per_token(lr, 0.0), per_token(gamma, 1.0),
            per_token(decay, 1.0)]
    y = c.emit(relax.call_tir(c.kernels[key], args, out_ty=relax.TensorType([rows, steps, dv], dtype)))
    return R.reshape(y, c.shape(c.out.shape))


def _omega_mlp(c: Ctx, qkv: list, per_token: list, lead: list, rows, steps, dk: int, dv: int, hidden: int,
               window: int) -> relax.Expr:
    """memory="mlp": the initial weights (one pair per head, [heads..., hidden, dk] / [heads..., dv, hidden])
    flattened to [H, ...] (row r = batch * H + head), and the MLP kernel."""
    dtype, residual = c.dtype, bool(c.a("residual"))
    heads = 1
    for d in c.in_type(0).shape[1:-2]:  # fixed sizes (the parameters' shapes)
        heads *= int(d)
    w1 = c.emit(R.reshape(_cast(c, c.weight("weight1"), dtype), [heads, hidden, dk]))
    w2 = c.emit(R.reshape(_cast(c, c.weight("weight2"), dtype), [heads, dv, hidden]))
    key = ("omega_mlp", dk, dv, hidden, window, residual, dtype, c.target_kind)
    if key not in c.kernels:
        kernel = omega_mlp_kernel(dk, dv, hidden, window, residual, dtype, gpu=c.target_kind == "cuda")
        c.kernels[key] = c.bb.add_func(kernel, f"omega_mlp_scan_k{dk}_v{dv}_h{hidden}_w{window}"
                                               + ("" if residual else "_nores"))
    q, k, v = qkv
    args = [c.emit(R.reshape(q, [rows, steps, dk])), c.emit(R.reshape(k, [rows, steps, dk])),
            c.emit(R.reshape(v, [rows, steps, dv])), *per_token, w1, w2]
    y = c.emit(relax.call_tir(c.kernels[key], args, out_ty=relax.TensorType([rows, steps, dv], dtype)))
    return R.reshape(y, c.shape(c.out.shape))


LOWERINGS = {"omega_memory": _omega_memory}
