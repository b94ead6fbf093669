"""Lookup substitution: computation over a finite domain folded into a precomputed table.

An embedding's output takes only `num` distinct values (one per table row), and so does a one-hot
encoding of a categorical value, or of several (one row per combination). A chain of per-token
operations after it (norms, linear maps, MLPs, activations, arithmetic with constants) therefore
also takes only `num` values, so the whole chain equals one embedding whose table is the chain
applied to the original table's rows (SEEDS.md rows 6 and 18). The folded table is computed by the
backend in float64 from a `("chain", table, steps)` weight expression.

A cost model decides: the chain must do some work per token, and the new table must stay within a
memory budget. The pass notes what it folded and the table size, for the manifest. An embedding
whose output is also read elsewhere (or is an output) stays for those readers; each foldable chain
after it becomes a table of its own.
"""

from __future__ import annotations

from ..ir import DTYPE_BYTES, FLOAT_DTYPES, Graph, Init, Node, ParamSpec, Ref
from ..rewrite import Editor
from . import PassContext, PassResult, register_pass
from .conv import _fresh_path
from .fusion import source

#: Ops applied to each token's vector independently (on the last dimension only: a norm's dim= the last).
PER_TOKEN = frozenset({"linear", "layer_norm", "rms_norm", "mlp", "relu", "gelu", "silu", "tanh", "sigmoid",
                       "exp", "abs", "neg", "dropout"})
SCALAR_OPS = frozenset({"add", "sub", "mul", "div"})
#: The largest folded table, in bytes.
TABLE_BUDGET = 64 * 2**20


def _step(ed: Editor, node: Node, prev: Ref, ctx: PassContext) -> tuple | None:
    """The fold step for `node` reading `prev`, or None when `node` is not per-token."""
    if node.op in PER_TOKEN:
        if node.op == "dropout" and not (ctx.inference or node.attr("p") == 0.0):
            return None
        if node.inputs != (prev,) or ed.shares(node) or node.attr("tie"):
            return None
        if node.op in ("layer_norm", "rms_norm") and node.attr("dim", -1) % node.type.rank != node.type.rank - 1:
            return None  # a norm over another dimension than the last mixes tokens
        params = tuple((p.name, source(node, p.name)) for p in node.params)
        attrs = tuple((k, v) for k, v in node.attrs if not k.endswith(("#", "?")))
        return (node.op, attrs, params)
    if node.op in SCALAR_OPS and len(node.inputs) == 2 and prev in node.inputs:
        other = node.inputs[1] if node.inputs[0] == prev else node.inputs[0]
        scalar = ed.node(other.node)
        if scalar.op != "scalar" or node.type.shape != ed.graph.type_of(prev).shape:
            return None
        return (node.op, (("value", float(scalar.attr("value"))), ("left", node.inputs[0] == other)), ())
    return None


def _start(ed: Editor, node: Node) -> tuple[tuple, list[Ref], list[int]] | None:
    """A finite-domain start: (table expression, index inputs, their domain sizes), or None.

    embedding(ids): the table itself. one_hot(ids, n): the identity table. concat of one-hots of
    several categorical values (a categorical MLP's input): one row per combination of values.
    """
    if node.op == "embedding" and not ed.shares(node):
        return source(node, "weight"), [node.inputs[0]], [node.attr("num")]
    if node.op == "one_hot":
        return ("eye", node.attr("num")), [node.inputs[0]], [node.attr("num")]
    if node.op == "concat" and node.attr("dim") in (-1, node.type.rank - 1) and len(node.inputs) > 1:
        parts = [ed.node(r.node) for r in node.inputs]
        if not all(p.op == "one_hot" and ed.uses(r) == 1 for p, r in zip(parts, node.inputs)):
            return None
        ids = [p.inputs[0] for p in parts]
        if len({(ed.graph.type_of(r).dtype, ed.graph.type_of(r).shape) for r in ids}) != 1:
            return None
        sizes = [p.attr("num") for p in parts]
        return ("onehot_product", tuple(sizes)), ids, sizes
    return None


def _index(ed: Editor, node: Node, ids: list[Ref], sizes: list[int]) -> Ref:
    """The row of the combined table: ((a * n_b) + b) * n_c + c ... as integer nodes."""
    idx = ids[0]
    for ref, n in zip(ids[1:], sizes[1:]):
        t = ed.graph.type_of(ref)
        plain = type(t)(t.dtype, t.shape)
        k = ed.add(Node("scalar", (), (("value", n), ("dtype", t.dtype)), (type(t)(t.dtype, ()),), node.span,
                        name="scalar", scope=node.scope))
        m = ed.add(Node("mul", (idx, Ref(k)), (), (plain,), node.span, name="index", scope=node.scope))
        a = ed.add(Node("add", (Ref(m), ref), (), (plain,), node.span, name="index", scope=node.scope))
        idx = Ref(a)
    return idx


def fold_chain(ed: Editor, nid: int, node: Node, ctx: PassContext, notes: list) -> bool:
    """Fold each chain of per-token ops that starts at `node` (a finite-domain start) into a table of its
    own. A start read by several ops (or also an output) gets a table per foldable branch; it stays for
    its other readers, and the tables take fresh module paths beside it."""
    start = _start(ed, node)
    if start is None:
        return False
    changed = False
    for user in ed.users(Ref(nid)):
        changed |= _fold_branch(ed, nid, node, user, start, ctx, notes)
    return changed


def _fold_branch(ed: Editor, nid: int, node: Node, user: int, start: tuple, ctx: PassContext, notes: list) -> bool:
    base, ids, sizes = start
    steps: list[tuple] = []
    chain: list[Node] = [node]
    cur, last = Ref(nid), None
    while True:
        un = ed.node(user)
        if un.scope != node.scope:
            break
        step = _step(ed, un, cur, ctx)
        if step is None:
            break
        steps.append(step)
        chain.append(un)
        cur, last = Ref(user), user
        if ed.uses(cur) != 1 or ed.is_output(cur):
            break
        (user,) = ed.users(cur)
    if last is None or all(s[0] == "dropout" for s in steps):
        return False
    num = 1
    for n in sizes:
        num *= n
    width = ed.node(last).type.shape[-1]
    dtype = ed.node(last).type.dtype  # the table holds the chain's results, in their dtype
    if dtype not in FLOAT_DTYPES:
        return False
    if not isinstance(width, int) or num * width * DTYPE_BYTES[dtype] > TABLE_BUDGET:
        return False
    table = ("chain", base, tuple(steps))
    frozen = all(p.frozen for n in chain for p in n.params)
    end = ed.node(last)
    # the start's own path when the table replaces it (its only reader, not an output); else a fresh one
    alone = ed.uses(Ref(nid)) == 1
    path = node.path if node.path and alone else \
        _fresh_path(ed, tuple(seg for f in node.scope for seg in f.segments), "table")
    index = ids[0] if len(ids) == 1 else _index(ed, node, ids, sizes)
    folded = Node("embedding", (index,), (("num", num), ("dim", width)), end.outputs,
                  node.span.merge(end.span), name=end.name if end.name != end.op else node.name, scope=node.scope,
                  params=(ParamSpec("weight", (num, width), Init("zeros"), dtype, frozen=frozen, derive=table),),
                  path=path)
    ed.set(last, folded)
    notes.append({"table": ".".join(folded.path), "ops": [node.op] + [s[0] for s in steps], "rows": num,
                  "width": width, "bytes": num * width * DTYPE_BYTES[dtype]})
    return True


@register_pass("fold_lookups", opt_level=2)
def fold_lookups(graph: Graph, ctx: PassContext) -> PassResult:
    """Fold an embedding (or one-hot categorical values) and the per-token layers after it into one table."""
    ed = Editor(graph)
    notes: list = []
    for nid in ed.graph.order():
        if nid in ed.graph.g:
            fold_chain(ed, nid, ed.node(nid), ctx, notes)
    ed.remove_dead()
    return PassResult(ed.graph, ed.changed, {"folded": notes} if notes else {})
