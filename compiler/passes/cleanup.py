"""Clean-up passes: constant folding, identity elimination, CSE, dead-code elimination.

Local rewrites are rule tables (STYLE.md point 6): a rule looks at one node and either rewrites the
graph through the `Editor` and returns True, or returns False. `run_rules` drives a rule set to a
fixpoint.
"""

from __future__ import annotations

import math
from typing import Callable

from ..ir import Graph, Node, Ref, slice_step
from ..registry import REGISTRY
from ..rewrite import Editor
from . import PassContext, PassResult, register_pass

Rule = Callable[[Editor, int, Node, PassContext], bool]


def run_rules(graph: Graph, rules: list[Rule], ctx: PassContext, max_rounds: int = 50) -> PassResult:
    ed = Editor(graph)
    applied = 0
    for _ in range(max_rounds):
        progress = False
        for nid in ed.graph.order():
            if nid not in ed.graph.g:
                continue
            node = ed.node(nid)
            if all(ed.uses(Ref(nid, i)) == 0 for i in range(len(node.outputs))):
                continue  # already bypassed: dead until the sweep below
            for rule in rules:
                if rule(ed, nid, node, ctx):
                    applied += 1
                    progress = True
                    break
        if not progress:
            break
    ed.remove_dead()
    return PassResult(ed.graph, ed.changed, {"rewrites": applied} if applied else {})


def forward_to(ed: Editor, nid: int, ref: Ref) -> bool:
    """Replace node `nid` (single output) by an existing value `ref` of the same type."""
    if ed.graph.type_of(Ref(nid)) != ed.graph.type_of(ref):
        return False
    ed.replace_uses(Ref(nid), ref)
    ed.drop_if_dead(nid)
    return True


# -- constant folding ---------------------------------------------------------------------------

_FOLD = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
         "div": lambda a, b: a / b, "pow": lambda a, b: a ** b,
         "floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b,  # Python's // and %: torch's, on numbers
         "maximum": max, "minimum": min}
_NEUTRAL_RIGHT = {"add": 0, "sub": 0, "mul": 1, "div": 1, "pow": 1}
_NEUTRAL_LEFT = {"add": 0, "mul": 1}


def _scalar_value(ed: Editor, ref: Ref):
    n = ed.node(ref.node)
    return n.attr("value") if n.op == "scalar" else None


def fold_scalar_arith(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """scalar op scalar -> scalar."""
    if node.op not in _FOLD:
        return False
    a, b = (_scalar_value(ed, r) for r in node.inputs)
    if a is None or b is None:
        return False
    try:
        v = _FOLD[node.op](a, b)
    except (ZeroDivisionError, OverflowError):
        return False
    if isinstance(v, complex) or (isinstance(v, float) and not math.isfinite(v)):
        return False
    dtype = node.type.dtype
    v = float(v) if dtype in ("f16", "bf16", "f32", "f64") else int(v)
    new = ed.add(Node("scalar", (), (("value", v), ("dtype", dtype)), node.outputs, node.span,
                      name="scalar", scope=node.scope))
    ed.replace_uses(Ref(nid), Ref(new))
    ed.drop_if_dead(nid)
    return True


def _neutral(op: str, value, neutral: int, dtype: str) -> bool:
    """Whether the constant `value` is `op`'s neutral element, exactly as IEEE computes: of floats,
    x + 0.0 is +0.0 for x = -0.0, so only -0.0 is neutral in a sum (0 + x too) and only +0.0 in x - 0."""
    if isinstance(value, bool) or value != neutral:
        return False
    if neutral != 0 or dtype not in ("f16", "bf16", "f32", "f64"):
        return True
    negative = math.copysign(1.0, value) < 0
    return negative if op == "add" else not negative


def drop_neutral(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """x * 1, x / 1, x + 0, x - 0, x ** 1, 1 * x, 0 + x -> x (when that changes no shape or dtype; the
    zeros of floats as `_neutral` says)."""
    if node.op not in _NEUTRAL_RIGHT:
        return False
    x, y = node.inputs
    if _neutral(node.op, _scalar_value(ed, y), _NEUTRAL_RIGHT[node.op], node.type.dtype):
        return forward_to(ed, nid, x)
    if node.op in _NEUTRAL_LEFT and _neutral(node.op, _scalar_value(ed, x), _NEUTRAL_LEFT[node.op],
                                             node.type.dtype):
        return forward_to(ed, nid, y)
    return False


@register_pass("fold_constants", opt_level=1)
def fold_constants(graph: Graph, ctx: PassContext) -> PassResult:
    """Fold arithmetic on constants and drop neutral operations (x * 1, x + 0)."""
    return run_rules(graph, [fold_scalar_arith, drop_neutral], ctx)


# -- identity elimination -----------------------------------------------------------------------

def drop_dropout(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """dropout(x, p=0), or any dropout in an inference build -> x."""
    if node.op != "dropout" or not (node.attr("p") == 0.0 or ctx.inference):
        return False
    return forward_to(ed, nid, node.inputs[0])


def cancel_transposes(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """transpose(transpose(x, a, b), a, b) -> x."""
    if node.op != "transpose":
        return False
    inner = ed.node(node.inputs[0].node)
    if inner.op != "transpose":
        return False
    rank = node.type.rank
    outer_axes = {node.attr("dim0") % rank, node.attr("dim1") % rank}
    inner_axes = {inner.attr("dim0") % rank, inner.attr("dim1") % rank}
    if outer_axes != inner_axes:
        return False
    return forward_to(ed, nid, inner.inputs[0])


def cancel_permutes(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """permute(permute(x, p), q) that composes to the identity -> x."""
    if node.op != "permute":
        return False
    inner = ed.node(node.inputs[0].node)
    if inner.op != "permute":
        return False
    rank = node.type.rank
    p = [d % rank for d in inner.attr("dims")]
    q = [d % rank for d in node.attr("dims")]
    if [p[i] for i in q] != list(range(rank)):
        return False
    return forward_to(ed, nid, inner.inputs[0])


def drop_noop_shape(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """reshape to the same shape, cast to the same dtype, permute by the identity -> x."""
    if node.op not in ("reshape", "cast", "permute"):
        return False
    if node.op == "permute" and [d % node.type.rank for d in node.attr("dims")] != list(range(node.type.rank)):
        return False
    x = node.inputs[0]
    src = ed.graph.type_of(x)
    if (src.dtype, src.shape) != (node.type.dtype, node.type.shape):
        return False
    ed.replace_uses(Ref(nid), x)
    ed.drop_if_dead(nid)
    return True


def collapse_reshapes(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """reshape(reshape(x, s1), s2) -> reshape(x, s2)."""
    if node.op != "reshape":
        return False
    inner_id = node.inputs[0].node
    inner = ed.node(inner_id)
    if inner.op != "reshape":
        return False
    ed.set(nid, node.replace(inputs=(inner.inputs[0],)))
    ed.drop_if_dead(inner_id)
    return True


def _full_slice(item, size) -> bool:
    """A whole dimension: ':' or '0:size', of step 1 (x[::2] is not whole)."""
    return (item[0] == "slice" and slice_step(item) == 1 and item[1] in (None, 0)
            and (item[2] is None or item[2] == size))


def select_from_stack(ed: Editor, nid: int, node: Node, ctx: PassContext) -> bool:
    """concat([unsqueeze(v0, k), unsqueeze(v1, k), ...], dim=k)[:, ..., i] -> vi: one step picked out of
    a stack (repeat(..., stack=true) then flows[-1]), so that the stack dies when nothing else reads it."""
    if node.op != "getitem":
        return False
    items = node.attr("index")
    stack = ed.node(node.inputs[0].node)
    if stack.op != "concat":
        return False
    shape = ed.graph.type_of(node.inputs[0]).shape
    k = stack.attr("dim") % len(shape)
    if len(items) <= k or items[k][0] != "int" or not isinstance(shape[k], int):
        return False
    if not all(_full_slice(item, shape[axis]) for axis, item in enumerate(items) if axis != k):
        return False
    i = items[k][1] % shape[k]
    offset = 0
    for ref in stack.inputs:
        size = ed.graph.type_of(ref).shape[k]
        if not isinstance(size, int):
            return False
        if offset <= i < offset + size:
            piece = ed.node(ref.node)
            if size != 1 or piece.op != "unsqueeze" or piece.attr("dim") % len(shape) != k:
                return False
            return forward_to(ed, nid, piece.inputs[0])
        offset += size
    return False


@register_pass("eliminate_identity", opt_level=1)
def eliminate_identity(graph: Graph, ctx: PassContext) -> PassResult:
    """Remove no-ops: dropout at inference, cancelling transposes/permutes, no-op reshapes and casts, and
    one step picked out of a stack of steps."""
    return run_rules(graph, [drop_dropout, cancel_transposes, cancel_permutes, drop_noop_shape, collapse_reshapes,
                             select_from_stack], ctx)


# -- common subexpressions ----------------------------------------------------------------------

_IMPURE = frozenset({"input", "dropout"})


def _attrs_key(attrs: tuple) -> tuple:
    """Attributes as a key in which -0.0 differs from 0 (equal as numbers: x / -0.0 is -inf, x / 0 inf)."""
    return tuple((k, ("-0.0",) if isinstance(v, float) and v == 0 and math.copysign(1.0, v) < 0 else v)
                 for k, v in attrs)


#: Ops whose axis counts in the result's rank, one more than the input's (unsqueeze(x, -1), stack(xs, -1)).
_NEW_AXIS = frozenset({"unsqueeze", "stack"})

#: Ops whose `axes` attribute is a set of dimensions (its order does not matter; one int is a set of one).
_AXIS_SETS = frozenset({"amax", "amin", "flip", "mean", "sum"})


#: (op, attribute) -> the attribute whose value it may take to mean the same as not being given: attend's
#: kv_heads=heads is attention with a key/value head per query head, attend() without kv_heads.
_SAME_AS_UNSET = {("attend", "kv_heads"): "heads"}


def _axes_key(graph: Graph, node: Node) -> tuple:
    """The attributes with every axis counted from the front (softmax(x, dim=-1) is softmax(x, dim=3) of a
    rank-4 x; unsqueeze's and stack's dim count in the result's rank), a reduction's axes as a sorted tuple, and an
    attribute that means what its absence means (_SAME_AS_UNSET) unset."""
    opdef = REGISTRY.get(node.op)
    if opdef is None or not node.inputs:
        return node.attrs
    rank = graph.type_of(node.inputs[0]).rank + (1 if node.op in _NEW_AXIS else 0)
    given = dict(node.attrs)
    out = []
    for k, v in node.attrs:
        same = _SAME_AS_UNSET.get((node.op, k))
        if same is not None and v == given.get(same):
            v = None
        arg = opdef.arg(k)
        if arg is not None and arg.kind in ("axis", "axes") and rank and v is not None:
            if isinstance(v, (list, tuple)):
                v = tuple(sorted(d % rank for d in v)) if node.op in _AXIS_SETS else tuple(d % rank for d in v)
            elif isinstance(v, int) and not isinstance(v, bool):
                v = (v % rank,) if node.op in _AXIS_SETS else v % rank
        out.append((k, v))
    return tuple(out)


@register_pass("cse", opt_level=1)
def cse(graph: Graph, ctx: PassContext) -> PassResult:
    """Compute identical parameter-free nodes (same op, inputs, attributes, scope) once; an axis counted from
    the end is the same as that axis counted from the front."""
    ed = Editor(graph)
    seen: dict[tuple, int] = {}
    merged = 0
    for nid in ed.graph.order():
        node = ed.node(nid)
        if node.params or node.op in _IMPURE:
            continue
        key = (node.op, node.inputs, _attrs_key(_axes_key(ed.graph, node)), node.outputs, node.scope)
        if key in seen:
            for i in range(len(node.outputs)):
                ed.replace_uses(Ref(nid, i), Ref(seen[key], i))
            merged += 1
        else:
            seen[key] = nid
    ed.remove_dead()
    return PassResult(ed.graph, ed.changed, {"merged": merged} if merged else {})


@register_pass("dce", opt_level=1)
def dce(graph: Graph, ctx: PassContext) -> PassResult:
    """Remove nodes (and their parameters) that no output depends on."""
    ed = Editor(graph)
    n = ed.remove_dead()
    return PassResult(ed.graph, ed.changed, {"removed": n} if n else {})
