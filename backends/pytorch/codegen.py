"""IR -> readable, standalone PyTorch source (`model.py`).

The flat IR is regrouped by the block instances recorded on its nodes: each block becomes an
`nn.Module` class whose forward takes the block's arguments (instances that compute the same from
their arguments share one, whichever values the calls pass), repetitions become an
`nn.ModuleList` driven by a loop, submodules are named after spec values, single-use unnamed
values are inlined into their consumer, and every statement carries a shape comment.

Identifiers in the output come only from validated spec names (checked again here), never from
raw spec text, so no spec can inject code. The same graph always gives the same text.
"""

from __future__ import annotations

import ast
import builtins
import functools
import keyword
import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from specc.compiler.dims import Sym, fmt, solve_all, symbol_name
from specc.compiler.dims import symbols as dims_symbols
from specc.compiler.ir import DTYPES, FLOAT_DTYPES, Frame, Graph, Node, Ref, TensorType

from .lowering import ATOM, EXT_PREFIX, HELPERS, LOWERINGS, Ctx, Expr, dim_text, lit, module_alias

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Names generated code uses itself; a spec value with one of these names gets a trailing '_'.
_TAKEN = frozenset({"torch", "nn", "F", "math", "json", "struct", "Path", "self", "Model", "MultiHeadAttention",
                    "MLP", "ACTIVATIONS", "Parameters", "layer", "apply_rotary", "TIED", "TORCH_COMPILE", "read_safetensors",
                    "load", "example_inputs", "INPUTS", "DIMS", "super", "range", "float", "int", "tuple", "list",
                    "dict", "len", "print", "None", "True", "False"})


#: The non-persistent, empty buffer of a generated class whose dtype is the module's float dtype: the
#: f32 values forward creates itself (one_hot, arange, casts, where between literals) take its dtype,
#: which module conversions (.double(), .half(), .to(dtype)) change. It is not in the state dict.
DTYPE_REF = "dtype_ref"


class CodegenError(Exception):
    """The graph cannot be written as PyTorch source (a compiler bug, or an unsupported op)."""


#: Python's builtins (a local named `sum` or `max` would hide the builtin from the code after it).
_BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith("_"))
#: The class the generator writes for the whole graph.
MODEL_CLASS = "Model"
#: The footer's function that Model.forward calls first, where the footer defines it: it checks the
#: inputs' ranks, dtypes and sizes against the declared ones (ValueError naming the input and dimension).
INPUT_CHECK = "check_inputs"


def bound_names(body: list[ast.stmt]) -> list[str]:
    """The names statements bind at the level of `body` (imports, assignments, classes, functions),
    each as often as it is bound; `if`/`try` blocks at that level are looked into."""
    names: list[str] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [a.asname or a.name.split(".")[0] for a in node.names]
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [n for t in targets for n in _target_names(t)]
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            names += bound_names([n for part in ("body", "orelse", "finalbody") for n in getattr(node, part, [])]
                                 + [n for h in getattr(node, "handlers", []) for n in h.body])
    return names


def _target_names(t: ast.expr) -> list[str]:
    if isinstance(t, ast.Name):
        return [t.id]
    if isinstance(t, (ast.Tuple, ast.List)):
        return [n for e in t.elts for n in _target_names(e)]
    return _target_names(t.value) if isinstance(t, ast.Starred) else []  # x.a = or x[i] = binds nothing


@functools.lru_cache(maxsize=64)
def module_names(source: str) -> frozenset[str]:
    """The names `source` (Python text of module level: the header, a helper, the footer) binds."""
    return frozenset(bound_names(ast.parse(source).body))


def helper_names() -> frozenset[str]:
    """The top-level names the helper snippets may define in model.py (keys of HELPERS and the
    classes, functions and globals their text defines), whether a model uses them or not."""
    return _helper_names(tuple(HELPERS))


@functools.lru_cache(maxsize=8)
def _helper_names(keys: tuple[str, ...]) -> frozenset[str]:
    names = set(keys)
    for k in keys:
        names |= module_names(HELPERS[k])
    return frozenset(names)


def ident(name: str, reserved: frozenset[str] = frozenset()) -> str:
    """The Python name of spec name `name`: with a trailing '_' where it would hide a name the generated
    code uses (a keyword, a builtin, a helper, or one of `reserved`, the module's own names)."""
    if not _IDENT.fullmatch(name):
        raise CodegenError(f"'{name}' is not a valid identifier")
    if keyword.iskeyword(name) or name in _TAKEN or name in _BUILTINS or name in helper_names() or name in reserved:
        return name + "_"
    if name.startswith(EXT_PREFIX):  # the prefix of imported custom-operator modules
        return "v" + name
    return name


def camel(name: str) -> str:
    parts = [p for p in name.split("_") if p]
    return "".join(p[:1].upper() + p[1:] for p in parts) or "Block"


def shape_comment(types: tuple[TensorType, ...]) -> str:
    return ", ".join("(" + ", ".join(fmt(d) for d in t.shape) + ("," if t.rank == 1 else "") + ")"
                     for t in types)


def with_param_dtype(ctor: str, node: Node) -> str:
    """A module constructor whose float parameters are of the node's float parameter dtype where that
    is not f32 (a layer applied to f64 values): torch's own modules take `dtype=`, the helper classes
    of the generated code are converted with `.to(...)` (integer buffers keep their dtype either way)."""
    floats = {p.dtype for p in node.params if p.dtype in FLOAT_DTYPES}
    if len(floats) != 1 or "f32" in floats:
        return ctor
    dtype = f"torch.{DTYPES[floats.pop()]}"
    if ctor.startswith("nn.") and ctor.endswith(")") and ctor.count("(") == 1:
        return ctor[:-1] + ("" if ctor.endswith("()") else ", ") + f"dtype={dtype})"
    return f"{ctor}.to({dtype})"


@dataclass
class Inst:
    """A block instance (or the top level): its own nodes and its child instances."""

    scope: tuple[Frame, ...]
    nodes: list[int] = field(default_factory=list)  # direct nodes, in id order
    children: list[tuple[Frame, ...]] = field(default_factory=list)
    all_nodes: set[int] = field(default_factory=set)
    ext: list[Ref] = field(default_factory=list)  # values from outside, in order of first use
    outs: list[Ref] = field(default_factory=list)  # values used outside
    args: dict[str, Ref] = field(default_factory=dict)  # the block's tensor arguments, in declaration order
    extras: list[Ref] = field(default_factory=list)  # values from outside that are none of its arguments


@dataclass
class ClassGroup:
    """Block instances that share one generated class: `rep` is the one its source is written from."""

    rep: tuple[Frame, ...]
    args: list[str]  # forward arguments: argument names of the block, then '?j' for rep.extras[j]
    name: str = ""


class Generator:
    def __init__(self, graph: Graph, header: str = "", footer: str = ""):
        self.graph = graph
        self.header = header
        self.footer = footer
        #: Every module-level name of model.py that is not the spec's: what the header and the footer
        #: import and define, every helper's names, the Model class, builtins and keywords. Block
        #: classes and values never take one of them (they get a trailing '_').
        self.reserved = (module_names(header) | module_names(footer) | helper_names() | _BUILTINS
                         | frozenset(keyword.kwlist) | {MODEL_CLASS})
        self.insts: dict[tuple[Frame, ...], Inst] = {}
        self.users: dict[Ref, list[int]] = {}
        self.output_refs = {ref for _, ref in graph.outputs}
        self.helpers: set[str] = set()
        self.imports: set[str] = set()  # modules of custom operators the code calls
        self.groups: list[ClassGroup] = []
        self.group_of: dict[tuple[Frame, ...], int] = {}  # block instance -> index in self.groups
        self.keys: dict[Any, int] = {}  # value numbering: key of a computation -> its number
        self.class_src: list[str] = []
        self.used_class_names = set(self.reserved)
        self.symbol_vars = frozenset(self.sym_name(s) for s in graph.dims)

    def ident(self, name: str) -> str:
        return ident(name, self.reserved)

    def sym_name(self, s: str) -> str:
        """The local variable holding symbolic dimension `s` (never a name generated code uses)."""
        return self.ident(s) if s != "layer" else "layer_"

    # -- structure ---------------------------------------------------------------------------
    def analyse(self) -> None:
        g = self.graph
        self.insts[()] = Inst(())
        for nid, node in sorted(g.nodes(), key=lambda kv: kv[0]):
            for i in range(len(node.scope) + 1):
                s = node.scope[:i]
                if s not in self.insts:
                    self.insts[s] = Inst(s)
                    self.insts[s[:-1]].children.append(s)
                self.insts[s].all_nodes.add(nid)
            self.insts[node.scope].nodes.append(nid)
            for ref in node.inputs:
                self.users.setdefault(ref, []).append(nid)
        for s, inst in self.insts.items():
            if not s:
                continue
            for nid in sorted(inst.all_nodes):
                for ref in g.node(nid).inputs:
                    if ref.node not in inst.all_nodes and ref not in inst.ext:
                        inst.ext.append(ref)
            for nid in sorted(inst.all_nodes):
                for i in range(len(g.node(nid).outputs)):
                    ref = Ref(nid, i)
                    if ref in self.output_refs or any(u not in inst.all_nodes for u in self.users.get(ref, [])):
                        inst.outs.append(ref)
            inst.args = self.block_args(s)
            inst.extras = [r for r in inst.ext if r not in inst.args.values()]
        self.group_instances()

    # -- classes -----------------------------------------------------------------------------
    def block_args(self, s: tuple[Frame, ...]) -> dict[str, Ref]:
        """The block arguments of instance `s` that it reads, with their values. A pass may have
        replaced an argument's value (a dropout removed at -O2): the value its recorded reads now read."""
        g = self.graph
        inst = self.insts[s]
        declared = g.block_args.get(s, ())
        args = {name: ref for name, ref in declared if ref in inst.ext}
        if len(args) < len(declared):
            now: dict[str, set[Ref]] = {}
            for nid in inst.all_nodes:
                node = g.node(nid)
                for slot, r in enumerate(node.inputs):
                    if r.node in inst.all_nodes:
                        continue
                    name, sc = g.arg_reads.get((nid, slot)), node.scope
                    while name is not None and sc != s:
                        name, sc = g.arg_passes.get((sc, name)), sc[:-1]
                    if name is not None:
                        now.setdefault(name, set()).add(r)
            args = {name: args[name] if name in args else next(iter(now[name]))
                    for name, _ in declared if name in args or len(now.get(name, ())) == 1}
        return args

    def arg_at(self, s: tuple[Frame, ...], ref: Ref, recorded: str | None) -> str:
        """The argument of instance `s` that a read of its outside value `ref` is: the one the elaborator
        recorded for that read, else the first argument passed that value, else '?j' (extras[j])."""
        inst = self.insts[s]
        if recorded is not None and inst.args.get(recorded) == ref:
            return recorded
        for name, r in inst.args.items():
            if r == ref:
                return name
        return f"?{inst.extras.index(ref)}"

    def arg_ref(self, s: tuple[Frame, ...], arg: str) -> Ref | None:
        inst = self.insts[s]
        if arg.startswith("?"):
            j = int(arg[1:])
            return inst.extras[j] if j < len(inst.extras) else None
        return inst.args.get(arg)

    def call_refs(self, s: tuple[Frame, ...]) -> list[Ref]:
        """The values a call of instance `s` passes, one per forward argument of its class."""
        return [self.arg_ref(s, a) for a in self.groups[self.group_of[s]].args]

    def read_arg(self, s: tuple[Frame, ...], nid: int, slot: int) -> str:
        return self.arg_at(s, self.graph.node(nid).inputs[slot], self.graph.arg_reads.get((nid, slot)))

    def pass_arg(self, s: tuple[Frame, ...], child: tuple[Frame, ...], arg: str, ref: Ref) -> str:
        return self.arg_at(s, ref, self.graph.arg_passes.get((child, arg)))

    def body_units(self, s: tuple[Frame, ...]) -> list[tuple[str, Any]]:
        """Direct nodes and direct child instances of `s` in a topological order."""
        inst = self.insts[s]
        unit_of: dict[int, tuple[str, Any]] = {}
        for nid in inst.nodes:
            unit_of[nid] = ("node", nid)
        for c in inst.children:
            for nid in self.insts[c].all_nodes:
                unit_of[nid] = ("call", c)
        dag = nx.DiGraph()
        dag.add_nodes_from(("node", nid) for nid in inst.nodes)
        dag.add_nodes_from(("call", c) for c in inst.children)
        for nid in inst.all_nodes:
            for r in self.graph.node(nid).inputs:
                if r.node in unit_of and unit_of[r.node] != unit_of[nid]:
                    dag.add_edge(unit_of[r.node], unit_of[nid])
        first = {u: (u[1] if u[0] == "node" else min(self.insts[u[1]].all_nodes)) for u in dag.nodes}
        return list(nx.lexicographical_topological_sort(dag, key=lambda u: first[u]))

    def number(self, key: Any) -> int:
        return self.keys.setdefault(key, len(self.keys))

    def computation(self, s: tuple[Frame, ...], value_of_arg) -> tuple[Any, ...]:
        """What instance `s` computes, as written in its class, from the values `value_of_arg(name)` of
        its class's arguments: value numbers of its outputs (ops, attributes, types, parameters and
        child classes included) and the modules it holds. Equal results: one class serves both."""
        g = self.graph
        inst = self.insts[s]
        val: dict[Ref, Any] = {}
        modules = []
        for kind, x in self.body_units(s):
            if kind == "node":
                n = g.node(x)
                ins = tuple(val[r] if r.node in inst.all_nodes else ("arg", value_of_arg(self.read_arg(s, x, i)))
                            for i, r in enumerate(n.inputs))
                params = (n.path[len(inst_path(s)):], tuple((p.name, p.shape, p.dtype, p.buffer) for p in n.params))
                outputs = tuple(TensorType(t.dtype, t.shape) for t in n.outputs)  # value ranges change no code
                k = self.number((n.op, n.attrs, outputs, params if n.params else None, ins))
                if n.params:
                    modules.append((n.op, n.attrs, outputs, params))
                for i in range(len(n.outputs)):
                    val[Ref(x, i)] = ("v", k, i)
            else:
                c = self.insts[x]
                frame = (x[-1].name, x[-1].index, self.group_of[x])
                modules.append(frame)
                if not c.outs:
                    continue
                ins = tuple(val[r] if r.node in inst.all_nodes else ("arg", value_of_arg(self.pass_arg(s, x, a, r)))
                            for a, r in zip(self.groups[self.group_of[x]].args, self.call_refs(x)))
                k = self.number(("call", frame, ins))
                for i, r in enumerate(c.outs):
                    val[r] = ("v", k, i)
        return tuple(val[r] for r in inst.outs), tuple(sorted(modules, key=repr))

    def group_instances(self) -> None:
        """Assign every block instance a class: deeper instances first (a class holds its children's),
        each joins the first class of its block that computes the same from its arguments, the
        instances most likely to serve others (fewest guessed argument reads, most nodes) found first."""
        order = {s: i for i, s in enumerate(self.insts)}

        def guessed(s: tuple[Frame, ...]) -> int:
            inst = self.insts[s]
            return sum(1 for nid in inst.all_nodes for slot, r in enumerate(self.graph.node(nid).inputs)
                       if r in inst.args.values() and (nid, slot) not in self.graph.arg_reads
                       and sum(1 for v in inst.args.values() if v == r) > 1)

        by_block: dict[str, list[int]] = {}
        for s in sorted((s for s in self.insts if s),
                        key=lambda s: (-len(s), guessed(s), -len(self.insts[s].all_nodes), order[s])):
            own = self.computation(s, lambda a, s=s: self.arg_ref(s, a))
            for gi in by_block.get(s[-1].block, []):
                grp = self.groups[gi]
                refs = {a: self.arg_ref(s, a) for a in grp.args}
                if None in refs.values() or len(self.insts[grp.rep].outs) != len(self.insts[s].outs):
                    continue
                if self.computation(grp.rep, refs.__getitem__) == own:
                    self.group_of[s] = gi
                    break
            else:
                self.group_of[s] = len(self.groups)
                by_block.setdefault(s[-1].block, []).append(len(self.groups))
                self.groups.append(ClassGroup(s, self.class_args(s)))

    def class_args(self, s: tuple[Frame, ...]) -> list[str]:
        """The forward arguments of the class written from instance `s`: the block arguments its body
        reads (in declaration order, each once), then the outside values that are none of them."""
        inst = self.insts[s]
        used: set[str] = set()
        for nid in inst.nodes:
            for slot, r in enumerate(self.graph.node(nid).inputs):
                if r.node not in inst.all_nodes:
                    used.add(self.read_arg(s, nid, slot))
        for c in inst.children:
            if self.insts[c].outs:
                for a, r in zip(self.groups[self.group_of[c]].args, self.call_refs(c)):
                    if r.node not in inst.all_nodes:
                        used.add(self.pass_arg(s, c, a, r))
        declared = [a for a in inst.args if a in used]
        return declared + sorted((a for a in used if a.startswith("?")), key=lambda a: int(a[1:]))

    # -- emission ----------------------------------------------------------------------------
    def generate(self) -> str:
        self.analyse()
        model_src = self.emit_class((), MODEL_CLASS)
        parts = [self.with_imports(self.header.rstrip()) + "\n"]
        for h in sorted(self.helpers):
            parts.append(HELPERS[h].rstrip() + "\n")
        parts.extend(self.class_src)
        parts.append(model_src)
        source = "\n\n\n".join(p.strip("\n") for p in parts) + "\n" + self.footer
        check_module(source)
        return source

    def with_imports(self, header: str) -> str:
        """The header with the modules of the custom operators imported after torch's imports."""
        if not self.imports:
            return header
        lines = ["# Custom operators (specc.custom_op): this model needs these modules on the Python path."]
        lines += [f"import {m} as {module_alias(m)}" for m in sorted(self.imports)]
        anchor = "from torch import nn\n"
        if anchor in header:
            return header.replace(anchor, anchor + "\n".join(lines) + "\n", 1)
        return header + "\n\n" + "\n".join(lines)

    def class_for(self, s: tuple[Frame, ...]) -> str:
        grp = self.groups[self.group_of[s]]
        if grp.name:
            return grp.name
        base = camel(s[-1].block)
        if base in self.reserved:  # a block F would hide torch.nn.functional as F, one called Path pathlib's
            base += "_"
        name, i = base, 2
        while name in self.used_class_names:
            name = f"{base}{i}"
            i += 1
        self.used_class_names.add(name)
        grp.name = name
        self.class_src.append(self.emit_class(grp.rep, name))
        return name

    def emit_class(self, s: tuple[Frame, ...], cls: str) -> str:
        inst = self.insts[s]
        g = self.graph
        init_lines: list[str] = []
        units = self.units(inst)
        # __init__: submodules of direct nodes and of child instances, in unit order
        declared: set[str] = set()
        for kind, payload in units:
            if kind == "node":
                node = g.node(payload)
                low = self.lowering(node)
                if node.params and low.init is not None:
                    ctor = low.init(self.ctx(node, {}, "None"), [g.type_of(r) for r in node.inputs])
                    if ctor:
                        ctor = with_param_dtype(ctor, node)
                        init_lines.append(f"self.{ident_attr(node.path[-1])} = {ctor}")
                        self.helpers.update(low.helpers)
                        self.imports.update(low.imports)
            else:
                children = payload
                attr = ident_attr(children[0][-1].name)
                if attr in declared:
                    continue
                declared.add(attr)
                group = [c for c in inst.children if c[-1].name == children[0][-1].name]
                names = [self.class_for(c) for c in group]
                if group[0][-1].index is None:
                    init_lines.append(f"self.{attr} = {names[0]}()")
                elif len(set(names)) == 1:
                    init_lines.append(f"self.{attr} = nn.ModuleList([{names[0]}() for _ in range({len(group)})])")
                else:
                    init_lines.append(f"self.{attr} = nn.ModuleList([{', '.join(n + '()' for n in names)}])")
        ties = self.ties(inst) if not s else []
        frozen = self.frozen() if not s else []
        attrs = {m.group(1) for ln in init_lines for m in [re.match(r"self\.(\w+) = ", ln)] if m}
        dtype_ref = DTYPE_REF
        while dtype_ref in attrs:  # a layer of the spec has the name
            dtype_ref += "_"
        uses: set[str] = set()
        body, args, symbols_used = self.emit_forward(inst, units, dtype_ref, uses)
        if "float_dtype" in uses:
            init_lines.append("# empty: .double(), .half(), .to(dtype) set its dtype, that of the floats forward creates")
            init_lines.append(f'self.register_buffer("{dtype_ref}", torch.empty(0), persistent=False)')
        lines = [f"class {cls}(nn.Module):"]
        doc = self.class_doc(s)
        lines.append(f'    """{doc}"""')
        lines.append("")
        lines.append("    def __init__(self):")
        lines.append("        super().__init__()")
        for ln in init_lines:
            lines.append("        " + ln)
        if ties:
            lines.append("        self.tie_weights()")
        if frozen:
            lines.append("        self.freeze()")
        lines.append("")
        if ties:
            lines.append("    def tie_weights(self) -> None:")
            lines.append('        """Share the tied parameters (call again after loading weights)."""')
            for dst, src in ties:
                lines.append(f"        self.{dst} = self.{src}")
            lines.append("")
        if frozen:
            lines.append("    def freeze(self) -> None:")
            lines.append('        """Turn off gradients of the frozen parameters (frozen=true and freeze: in the spec)."""')
            lines.append("        frozen = (")
            lines.extend(f"            {name!r}," for name in frozen)
            lines.append("        )")
            lines.append("        for name in frozen:")
            lines.append("            self.get_parameter(name).requires_grad_(False)")
            lines.append("")
        sig_args = ", ".join(f"{a}: torch.Tensor" for a in args)
        lines.append(f"    def forward(self{', ' if args else ''}{sig_args}):")
        lines.extend("        " + ln if ln else "" for ln in body)
        return "\n".join(lines) + "\n"

    def class_doc(self, s: tuple[Frame, ...]) -> str:
        if not s:
            return f"The {self.graph.name} model."
        return f"Block '{s[-1].block}'."

    def ties(self, inst: Inst) -> list[tuple[str, str]]:
        out = []
        for nid, node in self.graph.nodes():
            for p in node.params:
                if p.tied_to:
                    dst = ".".join(attr_path(node.path + tuple(p.name.split("."))))
                    out.append((dst, ".".join(attr_path(tuple(p.tied_to.split("."))))))
        return out

    def frozen(self) -> list[str]:
        """Full names of the frozen parameters that own storage (a tied one follows its owner; buffers
        are never trainable)."""
        out = []
        for _, node in self.graph.nodes():
            for p in node.params:
                if p.frozen and not p.buffer and not p.tied_to:
                    name = ".".join(node.path + (p.name,))
                    if not all(_IDENT.fullmatch(seg) or seg.isdigit() for seg in name.split(".")):
                        raise CodegenError(f"'{name}' is not a valid parameter name")
                    out.append(name)
        return out

    def units(self, inst: Inst) -> list[tuple[str, Any]]:
        """Direct nodes and child instances (repeat chains as one unit) in a topological order."""
        g = self.graph
        unit_of: dict[int, int] = {}
        units: list[tuple[str, Any]] = []
        groups: dict[str, list[tuple[Frame, ...]]] = {}
        for c in inst.children:
            groups.setdefault(c[-1].name, []).append(c)
        for nid in inst.nodes:
            unit_of[nid] = len(units)
            units.append(("node", nid))
        for name, members in groups.items():
            if members[0][-1].index is not None and self.chains(members):
                idx = len(units)
                units.append(("loop", members))
                for m in members:
                    for nid in self.insts[m].all_nodes:
                        unit_of[nid] = idx
            else:
                for m in members:
                    idx = len(units)
                    units.append(("call", [m]))
                    for nid in self.insts[m].all_nodes:
                        unit_of[nid] = idx
        dag = nx.DiGraph()
        dag.add_nodes_from(range(len(units)))
        for nid in inst.all_nodes:
            for r in g.node(nid).inputs:
                if r.node in unit_of and unit_of[r.node] != unit_of[nid]:
                    dag.add_edge(unit_of[r.node], unit_of[nid])
        if not nx.is_directed_acyclic_graph(dag):
            raise CodegenError("block instances interleave with their surroundings")  # a pass bug
        first = {i: min(self.unit_nodes(u)) for i, u in enumerate(units)}
        order = nx.lexicographical_topological_sort(dag, key=lambda i: first[i])
        return [units[i] for i in order]

    def unit_nodes(self, unit: tuple[str, Any]) -> set[int]:
        if unit[0] == "node":
            return {unit[1]}
        out: set[int] = set()
        for m in unit[1]:
            out |= self.insts[m].all_nodes
        return out

    def chains(self, members: list[tuple[Frame, ...]]) -> bool:
        """A repeat whose instances share a class and feed each other can be a loop."""
        if len(members) < 2:
            return False
        if len({self.class_for(m) for m in members}) != 1:
            return False
        for prev, cur in zip(members, members[1:]):
            p, c = self.insts[prev], self.insts[cur]
            if self.call_refs(cur) != p.outs or any(u not in c.all_nodes for r in p.outs for u in self.users.get(r, [])) \
                    or any(r in self.output_refs for r in p.outs):
                return False
        return True

    # -- forward -----------------------------------------------------------------------------
    def lowering(self, node: Node):
        low = LOWERINGS.get(node.op)
        if low is None:
            raise CodegenError(f"the PyTorch backend has no lowering for op '{node.op}'")
        return low

    def ctx(self, node: Node, dims_used: dict, device: str, float_dtype: str = "torch.float32",
            uses: set[str] | None = None) -> Ctx:
        def dim(d):
            if isinstance(d, Sym):
                for s in d.symbols:
                    dims_used[s] = True
            return dim_text(d, self.sym_name)

        g = self.graph
        scalars = tuple(g.node(r.node).attr("value") if g.node(r.node).op == "scalar" else None for r in node.inputs)
        return Ctx(node, dim, device, self.helpers, tuple(g.type_of(r).dtype for r in node.inputs), scalars,
                   float_dtype, set() if uses is None else uses)

    def emit_forward(self, inst: Inst, units, dtype_ref: str = DTYPE_REF,
                     uses: set[str] | None = None) -> tuple[list[str], list[str], set[str]]:
        """The forward body of `inst`'s class, its arguments and the symbols it reads. `dtype_ref` names
        the class's buffer whose dtype is the module's float dtype; `uses` records that the body reads it."""
        g = self.graph
        uses = set() if uses is None else uses
        names: dict[Ref, str] = {}
        # Arguments: block arguments (or graph inputs). A read of an outside value reads the argument
        # it was in the spec (a pseudo-ref per argument: two arguments may be passed one value)
        arg_refs: dict[str, Ref] = {}
        shapes_from: list[tuple[str, Ref]] = []  # (argument, its value): where symbolic sizes are read
        if inst.scope:
            args = []
            for k, a in enumerate(self.groups[self.group_of[inst.scope]].args):
                ref = self.arg_ref(inst.scope, a)
                base = a if not a.startswith("?") else g.node(ref.node).name or "x"
                args.append(self.fresh(base, set(args)))
                arg_refs[a] = Ref(-1 - k)
                names[arg_refs[a]] = args[-1]
                shapes_from.append((args[-1], ref))
        else:
            args = []
            for name, nid in g.inputs:
                args.append(self.ident(name))
                names[Ref(nid)] = args[-1]
                shapes_from.append((args[-1], Ref(nid)))
        # Which nodes are inlined into their single consumer
        use_count: dict[Ref, int] = {}
        for nid in inst.all_nodes:
            for r in g.node(nid).inputs:
                use_count[r] = use_count.get(r, 0) + 1
        for r in self.output_refs:
            use_count[r] = use_count.get(r, 0) + 1
        direct = set(inst.nodes)
        inline: set[int] = set()
        for nid in inst.nodes:
            node = g.node(nid)
            if node.op == "input" or len(node.outputs) != 1:
                continue
            ref = Ref(nid)
            consumers = self.users.get(ref, [])
            if ref in self.output_refs or ref in inst.outs or not consumers:
                continue
            if node.op == "scalar" and all(c in direct for c in consumers):
                inline.add(nid)  # a literal reads best where it is used, however often (cse shares them)
            elif use_count.get(ref, 0) == 1 and len(consumers) == 1 and consumers[0] in direct \
                    and node.name in ("", node.op):
                inline.add(nid)
        dims_used: dict[str, bool] = {}
        device = f"{args[0]}.device" if args else "None"
        exprs: dict[Ref, Expr] = {}
        statements: list[tuple[list[Ref], Any, str]] = []  # (targets, rendered rhs | loop, comment)

        def expr_of(ref: Ref) -> Expr:
            if ref in exprs:
                return exprs[ref]
            return Expr(f"<{ref}>", ATOM)  # placeholder replaced by the variable name later

        def read(ref: Ref, arg) -> Expr:
            """The value `ref` as an input; `arg()` names the block argument it is, if from outside."""
            if inst.scope and ref.node not in inst.all_nodes:
                return expr_of(arg_refs[arg()])
            return expr_of(ref)

        for kind, payload in units:
            if kind == "node":
                nid = payload
                node = g.node(nid)
                if node.op == "input":
                    continue
                low = self.lowering(node)
                self.helpers.update(low.helpers)
                self.imports.update(low.imports)
                e = low.expr(self.ctx(node, dims_used, device, f"self.{dtype_ref}.dtype", uses),
                             [read(r, lambda i=i: self.read_arg(inst.scope, nid, i)) for i, r in enumerate(node.inputs)])
                if nid in inline and len(e.text) <= 72:
                    exprs[Ref(nid)] = e
                    continue
                targets = [Ref(nid, i) for i in range(len(node.outputs))]
                statements.append((targets, e, shape_comment(node.outputs)))
            elif kind == "call":
                (child,) = payload
                c = self.insts[child]
                if not c.outs:
                    continue
                call_args = ", ".join(read(r, lambda a=a, r=r: self.pass_arg(inst.scope, child, a, r)).text
                                      for a, r in zip(self.groups[self.group_of[child]].args, self.call_refs(child)))
                attr = ident_attr(child[-1].name)
                target = f"self.{attr}" if child[-1].index is None else f"self.{attr}[{child[-1].index}]"
                statements.append((list(c.outs), Expr(f"{target}({call_args})"),
                                   shape_comment(tuple(g.type_of(r) for r in c.outs))))
            else:  # loop
                members = payload
                last = self.insts[members[-1]]
                first_args = zip(self.groups[self.group_of[members[0]]].args, self.call_refs(members[0]))
                statements.append((list(last.outs), ("loop", ident_attr(members[0][-1].name),
                                                     [read(r, lambda a=a, r=r: self.pass_arg(inst.scope, members[0], a, r))
                                                      for a, r in first_args]),
                                   shape_comment(tuple(g.type_of(r) for r in last.outs))))
        # Name the materialised values, reusing a name once its value is dead
        reads: dict[Ref, int] = {}
        placeholder = re.compile(r"<%(-?\d+)(?:\.(\d+))?>")

        def refs_in(text: str) -> list[Ref]:
            return [Ref(int(m.group(1)), int(m.group(2) or 0)) for m in placeholder.finditer(text)]

        for i, (targets, rhs, _) in enumerate(statements):
            texts = [rhs.text] if isinstance(rhs, Expr) else [x.text for x in rhs[2]]
            for t in texts:
                for r in refs_in(t):
                    reads[r] = i
        final_reads = len(statements)
        for r in (inst.outs if inst.scope else [ref for _, ref in g.outputs]):
            reads[r] = final_reads
        bound: dict[str, Ref] = {}
        for a, ref in ((names[r], r) for r in names):
            bound[a] = ref
        lines: list[str] = []
        for i, (targets, rhs, comment) in enumerate(statements):
            texts = rhs.text if isinstance(rhs, Expr) else None
            out_names = []
            for r in targets:
                node = g.node(r.node)
                hint = self.hint_for(r, inst)
                chosen = None
                for cand in candidates(hint, self.symbol_vars):
                    holder = bound.get(cand)
                    if holder is None or (reads.get(holder, -1) <= i and holder not in targets):
                        if cand in out_names:
                            continue
                        chosen = cand
                        break
                out_names.append(chosen)
            def fill(text: str) -> str:
                return placeholder.sub(lambda m: names[Ref(int(m.group(1)), int(m.group(2) or 0))], text)
            if isinstance(rhs, Expr):
                rhs_text = fill(texts)
                for r, n in zip(targets, out_names):
                    names[r] = n
                    bound[n] = r
                lhs = ", ".join(out_names)
                lines.append(f"{lhs} = {rhs_text}  # {comment}")
            else:
                _, attr, ins = rhs
                in_texts = [fill(x.text) for x in ins]
                for r, n in zip(targets, out_names):
                    names[r] = n
                    bound[n] = r
                carried = ", ".join(out_names)
                if in_texts != out_names:
                    lines.append(f"{carried} = {', '.join(in_texts)}")
                lines.append(f"for layer in self.{attr}:")
                lines.append(f"    {carried} = layer({carried})  # {comment}")
        outs = inst.outs if inst.scope else [ref for _, ref in g.outputs]
        out_texts = []
        for r in outs:
            out_texts.append(names[r] if r in names else placeholder.sub(
                lambda m: names[Ref(int(m.group(1)), int(m.group(2) or 0))], expr_of(r).text))
        lines.append(f"return {', '.join(out_texts)}" if out_texts else "return None")
        prologue = self.symbol_prologue(inst, shapes_from, sorted(dims_used))
        if not inst.scope and args and INPUT_CHECK in module_names(self.footer):
            prologue.insert(0, f"{INPUT_CHECK}(self, {', '.join(args)})  # ranks, dtypes and sizes as INPUTS declares")
        return prologue + lines, args, set(dims_used)

    def hint_for(self, ref: Ref, inst: Inst) -> str:
        node = self.graph.node(ref.node)
        hint = node.name or node.op
        if node.scope != inst.scope:  # the result of a child instance: name it after the call's value
            child = node.scope[len(inst.scope)]
            outs = self.insts[inst.scope + (child,)].outs if child.index is None else None
            hint = child.name if outs is None or len(outs) == 1 else f"{child.name}_{outs.index(ref)}"
        if "," in hint:
            parts = hint.split(",")
            hint = parts[ref.index] if ref.index < len(parts) else node.op
        return self.ident(hint) if _IDENT.fullmatch(hint) else node.op

    def fresh(self, base: str, taken: set[str]) -> str:
        base = self.ident(base) if _IDENT.fullmatch(base) else "x"
        for cand in candidates(base, self.symbol_vars):
            if cand not in taken:
                return cand
        raise AssertionError  # pragma: no cover

    def symbol_prologue(self, inst: Inst, ins: list[tuple[str, Ref]], symbols: list[str]) -> list[str]:
        """The lines that read the symbolic sizes `symbols` (and those they are solved with) from the
        arguments `ins`: a whole dimension's size, else solved from a dimension a * S + rest whose other
        symbols are read already (`dims.solve_all`). Lines in the order of `symbols`, each after those it
        reads."""
        g = self.graph
        how: dict[str, tuple[str, frozenset[str]]] = {}  # symbol -> (its line, the symbols it reads)
        for name, r in ins:
            for axis, d in enumerate(g.type_of(r).shape):
                s = symbol_name(d)
                if s is not None and s not in how:
                    how[s] = (f"{self.sym_name(s)} = {name}.shape[{axis}]  # symbolic dimension", frozenset())
        axes = [(name, axis, d) for name, r in ins for axis, d in enumerate(g.type_of(r).shape)]
        for i, s, a, rest in solve_all([d for _, _, d in axes], how):  # solved once the others are read
            name, axis, d = axes[i]
            size = f"{name}.shape[{axis}]"
            if isinstance(rest, int) and rest:
                size = f"({size} {'-' if rest > 0 else '+'} {abs(rest)})"
            elif rest:
                size = f"({size} - {dim_text(rest, self.sym_name)})"
            divisor = f" // {dim_text(a, self.sym_name)}" if a != 1 else ""
            how[s] = (f"{self.sym_name(s)} = {size}{divisor}  # symbolic dimension: {name}'s axis {axis} is {d}",
                      dims_symbols(a) | dims_symbols(rest))
        for s in symbols:
            if s not in how:
                raise CodegenError(f"symbolic dimension {s} is not readable from the inputs of "
                                   f"{'/'.join(inst_path(inst.scope)) or 'the model'}")
        lines: list[str] = []
        done: set[str] = set()

        def emit(s: str) -> None:
            if s in done:
                return
            done.add(s)
            for dep in sorted(how[s][1]):
                emit(dep)
            lines.append(how[s][0])

        for s in symbols:
            emit(s)
        return lines


def check_module(source: str) -> None:
    """CodegenError unless `source` parses and binds each of its module-level names once (two would
    mean a spec's name took one the generated code uses: the later would replace the earlier)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:  # pragma: no cover - a generator bug
        raise CodegenError(f"the generated source does not parse: {e}") from None
    seen: set[str] = set()
    for name in bound_names(tree.body):
        if name in seen:
            raise CodegenError(f"the generated module would define '{name}' twice")
        seen.add(name)


def candidates(base: str, avoid: frozenset[str] = frozenset()):
    if base not in avoid:
        yield base
    i = 1
    while True:
        if f"{base}_{i}" not in avoid:
            yield f"{base}_{i}"
        i += 1


def inst_path(s: tuple[Frame, ...]) -> tuple[str, ...]:
    return tuple(seg for f in s for seg in f.segments)


def ident_attr(name: str) -> str:
    if not _IDENT.fullmatch(name) or keyword.iskeyword(name):
        raise CodegenError(f"'{name}' is not a valid attribute name")
    return name


def attr_path(path: tuple[str, ...]) -> list[str]:
    """Module path segments as attribute access: ('h', '0', 'q') -> ['h[0]', 'q']."""
    out: list[str] = []
    for seg in path:
        if seg.isdigit() and out:
            out[-1] += f"[{seg}]"
        else:
            out.append(ident_attr(seg))
    return out


def generate_source(graph: Graph, header: str, footer: str = "") -> str:
    """model.py: `header` (docstring, imports, constants), the helpers and classes, then `footer` (the
    module-level functions after Model: load(), example_inputs())."""
    return Generator(graph, header, footer).generate()


__all__ = ["generate_source", "CodegenError", "DTYPES", "lit"]
