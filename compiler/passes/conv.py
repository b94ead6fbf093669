"""Convolution re-parameterisation for inference: BatchNorm folding and RepConv / RepVGG merging.

- fold_batch_norm: bn(conv(x)) or bn(linear(x)) at inference is one conv (linear) with
  W' = W * s and b' = (b - mean) * s + beta, where s = gamma / sqrt(var + eps).
- merge_parallel_convs: conv_a(x) + conv_b(x) [+ x] with the same stride, groups and centred
  padding is one conv whose kernel is the sum of the kernels, each zero-padded to the largest
  (a 1x1 kernel lands in the centre of a 3x3), and an identity branch is a kernel with one 1 at
  the centre of each channel's own filter (YOLOv9's RepConvN, RepVGG). At inference a
  batch-normalised identity bn(x) (RepVGG's third branch) is that kernel scaled per channel by
  s = gamma / sqrt(var + eps), with bias beta - mean * s (gamma = 1, beta = 0 without affine).

Both are exact up to float rounding; new weights are weight expressions evaluated in float64.
"""

from __future__ import annotations

from ..ir import Graph, Init, Node, ParamSpec, Ref
from ..rewrite import Editor
from . import PassContext, PassResult, register_pass
from .cleanup import run_rules
from .fusion import _has, _plain_params, source

CONVS = frozenset({"conv1d", "conv2d"})


def _single_use(ed: Editor, ref: Ref, scope, nested: bool = False) -> Node | None:
    """The node computing `ref` if only one reader needs it, in `scope` (or, nested, in a block inside it)."""
    n = ed.node(ref.node)
    inside = n.scope[:len(scope)] == scope if nested else n.scope == scope
    if not inside or ed.uses(ref) != 1 or ed.is_output(ref) or not _plain_params(n, ed):
        return None
    return n


def _fresh_path(ed: Editor, scope_path: tuple[str, ...], base: str) -> tuple[str, ...]:
    """A module path in `scope_path` that no node's parameters use yet."""
    taken = {n.path[len(scope_path)] for _, n in ed.graph.nodes()
             if len(n.path) > len(scope_path) and n.path[:len(scope_path)] == scope_path}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return scope_path + (name,)


def fold_bn_rule(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """bn(conv(x)) or bn(linear(x)) -> conv (linear) with the normalisation folded into its weights."""
    if node.op != "batch_norm" or not ctx.inference or ed.shares(node):
        return False
    prev = node.inputs[0]
    inner = _single_use(ed, prev, node.scope)
    if inner is None or inner.op not in CONVS | {"linear"} or inner.attr("tie"):
        return False
    if inner.op == "linear" and node.type.rank != 2:
        return False  # batch_norm normalises dimension 1, the linear's features only for [B, C]
    out = inner.type.shape[1] if inner.op in CONVS else inner.attr("out")
    eps = node.attr("eps")
    inv_std = ("rsqrt_add", source(node, "running_var"), eps)
    scale = ("mul", source(node, "weight"), inv_std) if node.attr("affine") else inv_std
    w = source(inner, "weight")
    rank = len(next(p for p in inner.params if p.name == "weight").shape)
    w = ("mul", w, ("reshape", scale, (out,) + (1,) * (rank - 1)))
    mean = source(node, "running_mean")
    centred = ("sub", source(inner, "bias"), mean) if _has(inner, "bias") else ("scale", mean, -1.0)
    b = ("mul", centred, scale)
    if node.attr("affine"):
        b = ("add", b, source(node, "bias"))
    wspec = next(p for p in inner.params if p.name == "weight")
    frozen = all(p.frozen for n in (inner, node) for p in n.params if not p.buffer)
    params = (ParamSpec("weight", wspec.shape, Init("zeros"), wspec.dtype, frozen=frozen, derive=w),
              ParamSpec("bias", (out,), Init("zeros"), wspec.dtype, frozen=frozen, derive=b))
    attrs = tuple((k, True if k == "bias" else v) for k, v in inner.attrs)
    ed.set(nid, inner.replace(attrs=attrs, params=params, outputs=node.outputs, span=inner.span.merge(node.span),
                              name=node.name if node.name != node.op else inner.name))
    ed.drop_if_dead(prev.node)
    return True


@register_pass("fold_batch_norm", opt_level=1)
def fold_batch_norm(graph: Graph, ctx: PassContext) -> PassResult:
    """Fold inference BatchNorm into the preceding convolution or linear layer."""
    return run_rules(graph, [fold_bn_rule], ctx)


def _geometry(n: Node, dims: int):
    def pair(v):
        return tuple(v) if isinstance(v, (list, tuple)) else (v,) * dims

    kernel, stride, dilation = pair(n.attr("kernel")), pair(n.attr("stride")), pair(n.attr("dilation"))
    padding = n.attr("padding")
    if padding == "same":
        padding = tuple((d * (k - 1)) // 2 for k, d in zip(kernel, dilation))
        if any((d * (k - 1)) % 2 for k, d in zip(kernel, dilation)):
            return None
    elif padding == "valid":
        padding = (0,) * dims
    else:
        padding = pair(padding)
    if any(d != 1 for d in dilation):
        return None
    # the offset of the kernel's centre from the output position: equal offsets line up
    offsets = tuple(p - (k - 1) / 2 for p, k in zip(padding, kernel))
    return kernel, stride, padding, offsets


def merge_convs_rule(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """conv_a(x) + conv_b(x) -> conv(x) with the summed kernel; conv(x) + x -> conv with an identity tap;
    conv(x) + batch_norm(x) at inference -> conv with the identity tap scaled by the normalisation."""
    if node.op != "add":
        return False
    a_ref, b_ref = node.inputs
    a, b = ed.node(a_ref.node), ed.node(b_ref.node)
    if a.op not in CONVS:
        a_ref, b_ref, a, b = b_ref, a_ref, b, a
    if a.op not in CONVS or _single_use(ed, a_ref, node.scope, nested=True) is None or a.type != node.type:
        return False
    dims = 1 if a.op == "conv1d" else 2
    ga = _geometry(a, dims)
    x = a.inputs[0]
    if ga is None:
        return False
    if b.op == a.op and b.inputs[0] == x and _single_use(ed, b_ref, node.scope, nested=True) is not None:
        gb = _geometry(b, dims)
        if gb is None or gb[1] != ga[1] or gb[3] != ga[3] or b.attr("groups") != a.attr("groups") \
                or b.type != a.type:
            return False
        kernel = tuple(max(i, j) for i, j in zip(ga[0], gb[0]))
        padding = tuple(max(i, j) for i, j in zip(ga[2], gb[2]))
        w = ("add", _pad_kernel(source(a, "weight"), ga[0], kernel), _pad_kernel(source(b, "weight"), gb[0], kernel))
        biases = [source(n, "bias") for n in (a, b) if _has(n, "bias")]
        merged = (a, b)
    elif (b_ref == x or _normalised_identity(ed, b_ref, x, node, ctx)) and all(s == 1 for s in ga[1]) \
            and all(o == 0 for o in ga[3]) and ed.graph.type_of(x) == node.type:
        kernel, padding = ga[0], ga[2]
        out = a.attr("out")
        tap = ("identity_kernel", (out, out // (a.attr("groups") or 1)) + kernel)  # grouped: inputs per group
        biases = [source(a, "bias")] if _has(a, "bias") else []
        merged = (a,)
        if b_ref != x:  # bn(x): the identity scaled per channel, and a bias of its own
            scale, shift = _bn_affine(b)
            tap = ("mul", tap, ("reshape", scale, (out,) + (1,) * (dims + 1)))
            biases.append(shift)
            merged = (a, b)
        w = ("add", source(a, "weight"), tap)
    else:
        return False
    bias = None
    for bb in biases:
        bias = bb if bias is None else ("add", bias, bb)
    wspec = next(p for p in a.params if p.name == "weight")
    shape = wspec.shape[:2] + kernel
    frozen = all(p.frozen for n in merged for p in n.params if not p.buffer)
    params = [ParamSpec("weight", shape, Init("zeros"), wspec.dtype, frozen=frozen, derive=w)]
    if bias is not None:
        params.append(ParamSpec("bias", (shape[0],), Init("zeros"), wspec.dtype, frozen=frozen, derive=bias))
    attrs = []
    for k, v in a.attrs:
        if k == "kernel":
            v = tuple(kernel) if dims == 2 else kernel[0]
        elif k == "padding":
            v = tuple(padding) if dims == 2 else padding[0]
        elif k == "bias":
            v = bias is not None
        attrs.append((k, v))
    old = [r.node for r in node.inputs]
    path = a.path
    if a.scope != node.scope:  # the branches lived in blocks of their own: the merged conv lives here
        scope_path = tuple(seg for f in node.scope for seg in f.segments)
        path = _fresh_path(ed, scope_path, node.name if node.name != node.op else a.op)
    ed.set(nid, a.replace(attrs=tuple(attrs), params=tuple(params), span=a.span.merge(node.span),
                          name=node.name if node.name != node.op else a.name, scope=node.scope, path=path))
    for n in old:
        ed.drop_if_dead(n)
    return True


def _normalised_identity(ed: Editor, ref: Ref, x: Ref, add: Node, ctx: PassContext) -> bool:
    """Whether `ref` is an inference batch_norm(x) that only `add` reads, its parameters its own."""
    if not ctx.inference:
        return False  # in training, batch_norm normalises with the batch's own statistics
    n = ed.node(ref.node)
    return n.op == "batch_norm" and n.inputs[0] == x and n.type == add.type \
        and _single_use(ed, ref, add.scope, nested=True) is not None


def _bn_affine(bn: Node) -> tuple[tuple, tuple]:
    """Inference batch_norm as y = x * s + t per channel: the weight expressions of s and t."""
    scale = ("rsqrt_add", source(bn, "running_var"), bn.attr("eps"))
    if bn.attr("affine"):
        scale = ("mul", source(bn, "weight"), scale)
    shift = ("scale", ("mul", source(bn, "running_mean"), scale), -1.0)
    if bn.attr("affine"):
        shift = ("add", shift, source(bn, "bias"))
    return scale, shift


def _pad_kernel(w: tuple, kernel: tuple, to: tuple) -> tuple:
    if kernel == to:
        return w
    return ("pad_kernel", w, tuple((t - k) // 2 for k, t in zip(kernel, to)), to)


@register_pass("merge_parallel_convs", opt_level=2)
def merge_parallel_convs(graph: Graph, ctx: PassContext) -> PassResult:
    """RepConv / RepVGG: parallel convolutions of one input (and an identity branch) into one convolution."""
    return run_rules(graph, [merge_convs_rule], ctx)
