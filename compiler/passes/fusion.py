"""Fusion passes: merging linear maps and attention projections, and choosing fused kernels.

New parameters carry a `derive` weight expression over the unoptimised graph's parameters
(compiler/weightexpr.py); the backend computes their values, in float64, when it builds.
"""

from __future__ import annotations

from ..ir import Graph, Init, Node, ParamSpec, Ref
from ..rewrite import Editor
from ..weightexpr import param as wparam
from . import PassContext, PassResult, register_pass
from .cleanup import run_rules


def source(node: Node, name: str) -> tuple:
    """The weight expression of a parameter of `node` as it stands (derived or original)."""
    for p in node.params:
        if p.name == name:
            return p.derive if p.derive is not None else wparam(".".join(node.path + (p.name,)))
    raise KeyError(name)


def _has(node: Node, name: str) -> bool:
    return any(p.name == name for p in node.params)


def _plain_params(node: Node, ed: Editor) -> bool:
    """Whether a rewrite may replace `node`'s parameters: none is shared with another layer."""
    return not ed.shares(node)


def merge_linear_pair(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """linear(linear(x, W1, b1), W2, b2) -> linear(x, W2 W1, W2 b1 + b2), when it needs fewer FLOPs."""
    if node.op != "linear":
        return False
    mid = node.inputs[0]
    inner = ed.node(mid.node)
    if inner.op != "linear" or inner.scope != node.scope or ed.uses(mid) != 1:
        return False
    if not (_plain_params(node, ed) and _plain_params(inner, ed)) or node.attr("tie") or inner.attr("tie"):
        return False
    if {p.frozen for p in node.params} != {p.frozen for p in inner.params}:
        return False
    d_in = ed.graph.type_of(inner.inputs[0]).shape[-1]
    hidden, out = inner.attr("out"), node.attr("out")
    if d_in * out > d_in * hidden + hidden * out:
        return False  # the merged matrix would cost more than the two it replaces
    w1, w2 = source(inner, "weight"), source(node, "weight")
    dtype = node.params[0].dtype  # the weights' dtype (that of the values both layers are applied to)
    params = [ParamSpec("weight", (out, d_in), Init("zeros"), dtype, frozen=node.params[0].frozen,
                        derive=("matmul", w2, w1))]
    b1 = source(inner, "bias") if _has(inner, "bias") else None
    b2 = source(node, "bias") if _has(node, "bias") else None
    bias = None
    if b1 is not None:
        bias = ("matmul", w2, b1)
        if b2 is not None:
            bias = ("add", bias, b2)
    elif b2 is not None:
        bias = b2
    if bias is not None:
        params.append(ParamSpec("bias", (out,), Init("zeros"), dtype, frozen=node.params[0].frozen, derive=bias))
    attrs = tuple((k, (bias is not None) if k == "bias" else v) for k, v in node.attrs)
    ed.set(nid, node.replace(inputs=(inner.inputs[0],), attrs=attrs, params=tuple(params),
                             span=inner.span.merge(node.span)))
    ed.drop_if_dead(mid.node)
    return True


@register_pass("merge_linear_chains", opt_level=2)
def merge_linear_chains(graph: Graph, ctx: PassContext) -> PassResult:
    """Merge consecutive linear maps with nothing between them into one, when that is cheaper."""
    return run_rules(graph, [merge_linear_pair], ctx)


def fuse_qkv_rule(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """Self-attention's q, k and v projections of one input -> one projection of width 3d ((heads + 2 *
    kv_heads) * head_dim with kv_heads=: the rows of q, then k, then v)."""
    if node.op != "attention" or node.attr("kv?") or node.attr("qkv") or not _plain_params(node, ed):
        return False
    d = node.type.shape[-1]
    q = next(p for p in node.params if p.name == "q.weight")
    k = next(p for p in node.params if p.name == "k.weight")
    inner = q.shape[0]  # heads * head_dim: d, unless the attention has head_dim=
    rows = 3 * inner if k.shape[0] == inner else inner + 2 * k.shape[0]  # kv_heads=: k, v of kv_heads * head_dim
    keep = [p for p in node.params if not p.name.startswith(("q.", "k.", "v."))]
    w = ("concat", 0, source(node, "q.weight"), source(node, "k.weight"), source(node, "v.weight"))
    dtype = q.dtype
    fused = [ParamSpec("qkv.weight", (rows, d), Init("zeros"), dtype, derive=w)]
    if node.attr("bias"):
        b = ("concat", 0, source(node, "q.bias"), source(node, "k.bias"), source(node, "v.bias"))
        fused.append(ParamSpec("qkv.bias", (rows,), Init("zeros"), dtype, derive=b))
    attrs = tuple((k, True if k == "qkv" else v) for k, v in node.attrs)
    ed.set(nid, node.replace(attrs=attrs, params=tuple(fused + keep)))
    return True


@register_pass("fuse_qkv", opt_level=2)
def fuse_qkv(graph: Graph, ctx: PassContext) -> PassResult:
    """Merge the q/k/v projections of self-attention into one matmul."""
    return run_rules(graph, [fuse_qkv_rule], ctx)


def sdpa_rule(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    if node.op != "attention" or node.attr("impl") == "sdpa":
        return False
    attrs = tuple((k, "sdpa" if k == "impl" else v) for k, v in node.attrs)
    ed.set(nid, node.replace(attrs=attrs))
    return True


@register_pass("attention_sdpa", opt_level=1)
def attention_sdpa(graph: Graph, ctx: PassContext) -> PassResult:
    """Lower softmax attention onto the fused scaled_dot_product_attention kernel."""
    return run_rules(graph, [sdpa_rule], ctx)


__all__ = ["merge_linear_chains", "fuse_qkv", "attention_sdpa", "source", "Ref"]


# -- linear adapters (LoRA, parallel linear branches) -----------------------------------------

def _linear_of(ed: Editor, ref: Ref, scope) -> Node | None:
    """The linear node computing `ref`, if it is plain, read only there, and in `scope`."""
    n = ed.node(ref.node)
    if n.op != "linear" or n.scope != scope or ed.uses(ref) != 1 or n.attr("tie") or not _plain_params(n, ed):
        return None
    return n


def _weights(n: Node) -> tuple[tuple, tuple | None]:
    return source(n, "weight"), (source(n, "bias") if _has(n, "bias") else None)


def _linear_node(template: Node, x: Ref, out: int, d_in: int, w: tuple, b: tuple | None, frozen: bool,
                 span) -> Node:
    dtype = template.params[0].dtype  # the template linear's weight: of the dtype of x
    params = [ParamSpec("weight", (out, d_in), Init("zeros"), dtype, frozen=frozen, derive=w)]
    if b is not None:
        params.append(ParamSpec("bias", (out,), Init("zeros"), dtype, frozen=frozen, derive=b))
    attrs = (("out", out), ("bias", b is not None), ("tie", None))
    return Node("linear", (x,), attrs, template.outputs, span, name=template.name, scope=template.scope,
                params=tuple(params), path=template.path)


def scale_into_linear(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """s * linear(x) -> linear(x) with s W and s b."""
    if node.op != "mul":
        return False
    for lin_ref, s_ref in (node.inputs, node.inputs[::-1]):
        scalar = ed.node(s_ref.node)
        lin = _linear_of(ed, lin_ref, node.scope)
        if scalar.op != "scalar" or lin is None or node.type != lin.type:
            continue
        s = float(scalar.attr("value"))
        w, b = _weights(lin)
        frozen = all(p.frozen for p in lin.params)
        d_in = ed.graph.type_of(lin.inputs[0]).shape[-1]
        new = _linear_node(lin, lin.inputs[0], lin.attr("out"), d_in, ("scale", w, s),
                           None if b is None else ("scale", b, s), frozen, lin.span.merge(node.span))
        ed.set(lin_ref.node, new)
        ed.replace_uses(Ref(nid), lin_ref)
        ed.drop_if_dead(nid)
        return True
    return False


def _as_dense(ed: Editor, ref: Ref, scope) -> tuple[Ref, tuple, tuple | None, Node] | None:
    """A linear map of some x (one linear, or a chain of linears) as (x, W, b, last node)."""
    lin = _linear_of(ed, ref, scope)
    if lin is None:
        return None
    w, b = _weights(lin)
    inner = _as_dense(ed, lin.inputs[0], scope)
    if inner is None:
        return lin.inputs[0], w, b, lin
    x, w0, b0, _ = inner
    bias = None if b0 is None else ("matmul", w, b0)
    if b is not None:
        bias = b if bias is None else ("add", bias, b)
    return x, ("matmul", w, w0), bias, lin


def merge_parallel(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """linear(x, W1) + (a chain of linear maps of x, e.g. LoRA's B(A x)) -> linear(x, W1 + W2)."""
    if node.op != "add":
        return False
    a, b = (_as_dense(ed, r, node.scope) for r in node.inputs)
    if a is None or b is None or a[0] != b[0] or node.type != a[3].type or node.type != b[3].type:
        return False
    x, w1, b1, base = a
    _, w2, b2, other = b
    bias = b1 if b2 is None else (b2 if b1 is None else ("add", b1, b2))
    frozen = all(p.frozen for n in (base, other) for p in n.params)
    d_in = ed.graph.type_of(x).shape[-1]
    old_inputs = [r.node for r in node.inputs]
    ed.set(nid, _linear_node(base, x, base.attr("out"), d_in, ("add", w1, w2), bias, frozen,
                             base.span.merge(node.span)))
    for n in old_inputs:
        ed.drop_if_dead(n)
    return True


@register_pass("merge_adapters", opt_level=2)
def merge_adapters(graph: Graph, ctx: PassContext) -> PassResult:
    """Merge LoRA and other linear adapters (parallel linear branches of one input) into the base weight."""
    return run_rules(graph, [scale_into_linear, merge_parallel], ctx)
