"""PyTorch lowering of attend (compiler/ops_attention.py): attention over the spec's own projections.

It reads `MultiHeadAttention.attend(q, k, v, heads=4, causal=True, ...)` in generated code: the
static method that the attention layer itself calls after its projections, so model.py has one
implementation of the softmax attention core. With kv_heads= (grouped-query attention) it reads
`MultiHeadAttentionGQA.attend(q, k, v, heads=4, kv_heads=2, ...)`, which repeats the key/value heads
(and the prefix rows) as the grouped-query attention layer does, then calls the same core.
"""

from __future__ import annotations

from .lowering import Ctx, Expr, Lowering, call


def _attend(c: Ctx, xs: list[Expr]) -> Expr:
    parts = [x.text for x in xs[:3]] + [f"heads={c.a('heads')}"]
    kv_heads = c.node.attr("kv_heads")
    helper = "MultiHeadAttention"
    if kv_heads is not None and kv_heads != c.a("heads"):  # grouped-query: the subclass's attend repeats the
        helper = "MultiHeadAttentionGQA"  # key/value heads (plain attend's generated code stays as it was)
        c.helpers.add(helper)
        parts.append(f"kv_heads={kv_heads}")
    if c.a("causal"):
        parts.append("causal=True")
    i = 3
    for option in ("mask", "prefix"):
        if c.a(f"{option}?"):
            parts.append(f"{option}={xs[i].text}")
            i += 1
    return call(f"{helper}.attend({', '.join(parts)})")


LOWERINGS: dict[str, Lowering] = {
    "attend": Lowering(_attend, helpers=("MultiHeadAttention",)),
}
