"""PyTorch lowering of attend (compiler/ops_attention.py): attention over the spec's own projections.

It reads `MultiHeadAttention.attend(q, k, v, heads=4, causal=True, ...)` in generated code: the
static method that the attention layer itself calls after its projections, so model.py has one
implementation of the softmax attention core.
"""

from __future__ import annotations

from .lowering import Ctx, Expr, Lowering, call


def _attend(c: Ctx, xs: list[Expr]) -> Expr:
    parts = [x.text for x in xs[:3]] + [f"heads={c.a('heads')}"]
    if c.a("causal"):
        parts.append("causal=True")
    i = 3
    for option in ("mask", "prefix"):
        if c.a(f"{option}?"):
            parts.append(f"{option}={xs[i].text}")
            i += 1
    return call(f"MultiHeadAttention.attend({', '.join(parts)})")


LOWERINGS: dict[str, Lowering] = {
    "attend": Lowering(_attend, helpers=("MultiHeadAttention",)),
}
