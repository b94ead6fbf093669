"""Attention over given projections: the softmax attention core without the layer around it.

`attention` owns its q/k/v/o projections; `attend(q, k, v, heads)` takes queries, keys and values that
the spec computes itself, so the projections can be anything the language writes: LoRA-adapted linear
layers (Hu et al., 2021; He et al., 2022, SEEDS.md row 9), parameter-token layers, lookups. It has no
parameters and no randomness (no dropout), so passes may compute two equal calls once; the merge passes
see the spec's own linear layers around it.
"""

from __future__ import annotations

from .ir import TensorType
from .dims import fmt
from .ops import (_check_attention_mask, attention_core_flops, check_attention_prefix, check_batch_broadcast,
                  fixed_width, need_float, need_rank, shape_str)
from .registry import Arg, OpCall, OpError, op

T = TensorType


def _attend_flops(c: OpCall, outs):
    # the scores and the weighted sum are those of `heads` query heads over q's width, with kv_heads= too
    # (a key/value head read by several query heads saves no multiply)
    return attention_core_flops(c.t("q"), c.t("k").shape[-2], c.a("heads"), c.t("mask"), c.t("prefix"))


@op("attend", Arg("q", "tensor"), Arg("k", "tensor"), Arg("v", "tensor"), Arg("heads", "int"),
    Arg("causal", "bool", False), Arg("mask", "tensor?", None), Arg("prefix", "tensor?", None),
    Arg("kv_heads", "int", None, shown=False), flops=_attend_flops, category="layer")
def _attend(c: OpCall):
    """attend(q, k, v, heads, causal=false, mask=none, prefix=none, kv_heads=none): multi-head softmax
    attention over projected queries q [..., T, d] and keys and values k, v [..., S, d],
    softmax(q k^T / sqrt(d / heads)) v per head, -> [..., T, d] (heads concatenated; no output projection).

    The batch dimensions of k and v may be fewer or 1 and broadcast to q's. causal, mask= and prefix=
    as for attention: a bool (true = may attend) or additive float mask broadcastable to [..., T, S] or
    [..., heads, T, S]; prefix [..., 2, l, d] puts l key rows and l value rows before k and v, seen by
    every query.

    kv_heads: grouped-query attention (kv_heads=1: multi-query attention): k and v have kv_heads heads of
    q's head width d / heads, [..., S, kv_heads * d / heads], and query head i reads key/value head
    i // (heads / kv_heads) (torch's repeat_interleave of the key/value heads; scaled_dot_product_attention
    with enable_gqa=True). It must divide heads (default heads: one key/value head per query head). A
    prefix then has rows of that width, [..., 2, l, kv_heads * d / heads]; a per-head mask still has
    heads slices, one per query head. FLOPs are those of heads query heads, as without it.
    """
    q, k, v = c.t("q"), c.t("k"), c.t("v")
    for name, t in (("q", q), ("k", k), ("v", v)):
        need_float(t, "attend", name)
        need_rank(t, 2, "attend", name)
    heads = c.a("heads")
    d = fixed_width(q.shape[-1], "attend", "width of q (its last dimension)", "q")
    if heads <= 0 or d % heads:
        raise OpError(f"attend: the width {d} is not divisible by heads={heads}", "heads")
    kv_heads = c.attrs.get("kv_heads")
    if kv_heads is not None and (kv_heads <= 0 or heads % kv_heads):
        raise OpError(f"attend: kv_heads={kv_heads} must be positive and divide heads={heads} (each group of "
                      f"heads / kv_heads query heads shares one key/value head)", "kv_heads")
    grouped = kv_heads is not None and kv_heads != heads
    kv_width = d // heads * kv_heads if grouped else d  # the width of k, v and the prefix rows
    if not grouped and (k.dtype != q.dtype or k.shape[-1] != q.shape[-1]):
        raise OpError(f"attend: keys k {shape_str(k)} must have the dtype and width of the queries q {shape_str(q)}",
                      "k")
    if grouped and k.dtype != q.dtype:
        raise OpError(f"attend: keys k {shape_str(k)} must have the dtype of the queries q {shape_str(q)}", "k")
    if grouped and k.shape[-1] != kv_width:
        raise OpError(f"attend: keys k {shape_str(k)} must have the width kv_heads * head_dim = {kv_heads} * "
                      f"{d // heads} = {kv_width} (head_dim = {d} / heads={heads}, from the queries q {shape_str(q)}), "
                      f"got {fmt(k.shape[-1])}", "k")
    if v != k and (v.dtype, v.shape) != (k.dtype, k.shape):
        raise OpError(f"attend: values v {shape_str(v)} must have the shape and dtype of the keys k {shape_str(k)}",
                      "v")
    check_batch_broadcast(k, q, "attend", "k", "q")
    if c.a("causal") and k.shape[-2] != q.shape[-2]:
        raise OpError(f"attend: causal attention needs as many keys as queries, got k {shape_str(k)} for q "
                      f"{shape_str(q)}", "causal")
    if c.t("mask") is not None:
        _check_attention_mask(c.t("mask"), q, k.shape[-2], heads, "attend", "q")
    if c.t("prefix") is not None:
        check_attention_prefix(c.t("prefix"), q, "attend", "q", width=kv_width if grouped else None,
                               width_name="kv_heads * head_dim")
    return T(q.dtype, q.shape)
