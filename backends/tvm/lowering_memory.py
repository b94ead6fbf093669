"""TVM (Relax) lowering of the test-time memory operators (compiler/ops_memory.py).

omega_memory is a recurrence over the tokens, written as one TIR kernel (as the LSTM's): the leading
dimensions of q, k, v are flattened into rows R (batch x heads), the scalars lr / gamma / decay are
broadcast to one value per token, and the kernel runs one task per (row, memory row j): the memory's
row j, M[j, :] (dk values, in registers or local memory), evolves on its own, since

    M_t[j, :] = decay_t * M_{t-1}[j, :] - lr_t * sum_i gamma_i (M_{t-1}[j, :] . k_i - v_i[j]) k_i,
    y_t[j] = M_t[j, :] . q_t.

CPU: the R * dv tasks in parallel; CUDA: a thread block per row, a thread per memory row.
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

    @T.macro
    def memory_row(q, k, v, lr, gamma, decay, y, L, r, j):
        """Memory row j of row r over every step: M[j, :] in local memory, the window's errors first."""
        m = T.decl_buffer((dk,), dtype, scope="local")
        e = T.decl_buffer((C,), dtype, scope="local")
        acc = T.decl_buffer((1,), dtype, scope="local")
        for a in range(dk):
            m[a] = T.Cast(dtype, 0)
        for t in range(L):
            for w in range(C):
                e[w] = T.Cast(dtype, 0)
                if t + w >= C - 1:  # token i = t + w - (C - 1) of the window, if there is one
                    acc[0] = T.Cast(dtype, 0)
                    for a in range(dk):
                        acc[0] = acc[0] + m[a] * k[r, t + w - (C - 1), a]
                    e[w] = (acc[0] - v[r, t + w - (C - 1), j]) * gamma[r, t + w - (C - 1)]
            acc[0] = T.Cast(dtype, 0)
            for a in range(dk):
                m[a] = decay[r, t] * m[a]
                for w in range(C):
                    if t + w >= C - 1:
                        m[a] = m[a] - lr[r, t] * e[w] * k[r, t + w - (C - 1), a]
                acc[0] = acc[0] + m[a] * q[r, t, a]
            y[r, t, j] = acc[0]

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
                    memory_row(q, k, v, lr, gamma, decay, y, L, r, j)
        else:
            for task in T.parallel(Rn * dv):
                memory_row(q, k, v, lr, gamma, decay, y, L, task // dv, task % dv)

    return omega_scan


def _omega_memory(c: Ctx, xs: list) -> relax.Expr:
    if c.target_kind not in ("llvm", "cuda"):
        raise LoweringError(f"omega_memory: no recurrence kernel for target {c.target_kind} (llvm and cuda only)")
    qt, vt = c.in_type(0), c.in_type(2)
    dk, dv, window = int(qt.shape[-1]), int(vt.shape[-1]), int(c.a("window"))
    if dk > MAX_KEY_WIDTH:
        raise LoweringError(f"omega_memory: the key width {dk} is over the kernel's {MAX_KEY_WIDTH}")
    if c.target_kind == "cuda" and dv > 1024:
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

    key = ("omega", dk, dv, window, dtype, c.target_kind)
    if key not in c.kernels:
        c.kernels[key] = c.bb.add_func(omega_kernel(dk, dv, window, dtype, gpu=c.target_kind == "cuda"),
                                       f"omega_scan_k{dk}_v{dv}_w{window}")
    args = [c.emit(R.reshape(q, [rows, steps, dk])), c.emit(R.reshape(k, [rows, steps, dk])),
            c.emit(R.reshape(v, [rows, steps, dv])), per_token(lr, 0.0), per_token(gamma, 1.0),
            per_token(decay, 1.0)]
    y = c.emit(relax.call_tir(c.kernels[key], args, out_ty=relax.TensorType([rows, steps, dv], dtype)))
    return R.reshape(y, c.shape(c.out.shape))


LOWERINGS = {"omega_memory": _omega_memory}
