"""Elaboration: a validated spec (YAML layer + parsed bodies) -> a typed `Graph`.

Binds parameters (with overrides), declares symbolic dimensions, evaluates the graph body
statement by statement, inlines block calls and repetitions (recording each instance as a `Frame`
on its nodes), runs every op's shape rule, and checks the declared outputs.

Errors never stop elaboration early: a failing statement binds its names to `POISON`, which
silently propagates, so every independent error is reported once, with its location.

Specs are untrusted, so elaboration is bounded: repeat counts, the number of nodes, the nesting of
blocks and expressions, and tensor sizes all have limits that end in a located error, never in a
hang, a memory blow-up or a Python RecursionError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import importlib
import keyword
import math
import re
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

import networkx as nx

from specc.dsl import ast as A
from specc.dsl.diagnostics import Collector, Diagnostic, Span, SpecError, did_you_mean
from specc.dsl.parser import parse, walk
from specc.dsl.schema import RESERVED, DimDecl, OutputDecl, SpecSource, check_identifier
from specc.dsl.yamlpos import TextOrigin

from . import ops as _ops  # noqa: F401  (registers the built-in operators)
from .dims import Dim, Sym, div_exact, evaluate, fmt, is_dim, readable_symbols
from .ir import DTYPES, FLOAT_DTYPES, INT_RANGES, NODE, Frame, Graph, Init, Node, ParamSpec, Ref, TensorType
from .registry import REGISTRY, REQUIRED, Arg, OpCall, OpDef, OpError
from .tied import partial_tie_message, select, tied_names

#: Options any operator that owns parameters takes, handled here rather than by each op:
#: frozen=true, init=normal(0.02), bias_init=zeros, share=v (reuse the parameters of the layer that computed v),
#: init_from=v (start as a copy of the initial values of the layer that computed v; storage stays separate).
CALL_OPTIONS = ("frozen", "init", "bias_init", "share", "init_from")
#: Initialisers an `init=` / `bias_init=` option may name, with the arguments each takes.
INITIALISERS = {"normal": ("std", "mean"), "uniform": ("bound",), "constant": ("value",), "zeros": (), "ones": (),
                "eye": ()}

#: (operator, argument) pairs whose number may be infinite (the `inf` literal): masked_fill(s, m, -inf).
#: Every other number argument must be finite (-inf as a tensor value goes through a scalar node).
INFINITE_OK = frozenset({("masked_fill", "value")})
#: Number arguments that become tensors (ops.NUMBER_ARGS) and may be infinite: where(m, s, -inf), x < inf.
INFINITE_TENSOR_OK = frozenset({("where", "x"), ("where", "y")} | {(n, a) for n in _ops.COMPARE_OPS.values()
                                                                  for a in ("x", "y")})

#: repeat(n, block, x, ...)'s own keyword options (every other keyword goes to the block), with what each does.
REPEAT_OPTIONS = {"share": "makes every step reuse the parameters of the first step (share=v: those of the same "
                           "step of the earlier repeat that computed v)",
                  "stack": "gives each carried value of every step, stacked along a new leading axis"}

OVERRIDES_FILE = "<--set>"
#: where an override given from Python (specc.load(path, d=3), no --set text) is said to be
API_OVERRIDES = "<keyword overrides>"
DEFAULT_EXAMPLE = {"B": 2}
DEFAULT_SYMBOL_EXAMPLE = 8

MAX_REPEAT = 10_000  # the count of one repeat(...)
MAX_NODES = 100_000  # nodes in the elaborated graph, all repeats and block calls inlined
MAX_BLOCK_DEPTH = 32  # blocks calling blocks
MAX_EVAL_DEPTH = 120  # nested expressions being evaluated, through block calls (about 4 Python frames each)
MAX_SIZE = 2 ** 63 - 1  # the largest tensor dimension (and element count) a backend can index
#: The least and the largest value of each integer dtype a value range may name.
_INT_LIMITS = {"i8": (-2 ** 7, 2 ** 7 - 1), "u8": (0, 2 ** 8 - 1), "i32": (-2 ** 31, 2 ** 31 - 1),
               "i64": (-2 ** 63, 2 ** 63 - 1)}
MAX_RANK = 32  # dimensions of one tensor (torch allows 64; no model of the zoo comes near 8)

#: Attribute names an nn.Module already has; a module path segment never takes one of these.
MODULE_ATTRS = frozenset({
    "training", "forward", "train", "eval", "parameters", "buffers", "modules", "children", "to", "cuda", "cpu",
    "float", "double", "half", "bfloat16", "apply", "state_dict", "load_state_dict", "named_parameters",
    "named_buffers", "named_modules", "named_children", "register_buffer", "register_parameter", "zero_grad",
    "type", "extra_repr", "requires_grad_", "share_memory", "get_parameter", "get_submodule", "get_buffer",
    "add_module", "register_module", "dump_patches", "call_super_init", "compile", "ipu", "xpu", "mtia",
    "to_empty", "load", "example_inputs", "config",
})


class _Poison:
    def __repr__(self) -> str:
        return "POISON"


POISON = _Poison()


@dataclass(frozen=True)
class TV:
    """A tensor value during elaboration."""

    ref: Ref
    type: TensorType
    #: (block instance, argument name) while this is a block's argument as it was passed (not compared)
    arg: tuple[tuple[Frame, ...], str] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BlockRef:
    name: str


@dataclass(frozen=True)
class OpRef:
    name: str


@dataclass(frozen=True)
class DTypeRef:
    name: str


@dataclass
class Block:
    sig: A.Signature
    body: A.Body | None
    span: Span


@dataclass
class _Scope:
    """One block instance (or the top level) being elaborated."""

    frames: tuple[Frame, ...]
    names: set[str] = field(default_factory=set)
    env: dict[str, Any] = field(default_factory=dict)
    #: The body had a syntax error on a line whose names could not be read: an unknown name may
    #: be one of those, so it is not reported.
    lenient: bool = False

    def claim(self, base: str, fallback: str | None = None) -> str:
        """A unique module attribute name in this scope: `base`, else `fallback`, else a numbered one."""
        if base in MODULE_ATTRS or keyword.iskeyword(base):
            base = base + "_"
        if base in self.names and fallback and fallback not in self.names:
            base = fallback
        name, i = base, 1
        while name in self.names:
            name = f"{base}_{i}"
            i += 1
        self.names.add(name)
        return name

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(s for f in self.frames for s in f.segments)


def _nodes_of_value(value: Any) -> bool:
    return isinstance(value, TV) or (isinstance(value, (list, tuple)) and any(_nodes_of_value(v) for v in value))


class Elaborator:
    def __init__(self, src: SpecSource, overrides: Mapping[str, Any] | None = None,
                 override_text: Mapping[str, tuple[str, Span]] | None = None,
                 allow_imports: Collection[str] = ()):
        self.src = src
        self.allow_imports = frozenset(allow_imports)
        self.imported: set[str] = set()  # modules of `imports:` imported (custom operators visible)
        self.import_failed = False  # an import was refused or failed: an unknown operator may be one of its
        self.spec = src.spec
        self.doc = src.doc
        self.errors = Collector()
        self.errors.extend(src.pending)  # errors of the YAML layer, whose entries were left out
        self.overrides = dict(overrides or {})
        self.override_text = dict(override_text or {})
        self.sources = {src.file: src.text}
        self.params: dict[str, Any] = {}
        self.symbols: dict[str, tuple[int, int, int | None]] = {}
        self.blocks: dict[str, Block] = {}
        self.graph = Graph(self.spec.name, seed=self.spec.seed)
        self.stack: list[str] = []  # block call stack, to refuse recursion
        self.depth = 0  # nesting of `ev` calls, bounded by MAX_EVAL_DEPTH
        self.too_big = False  # MAX_NODES was reached: no more nodes are added
        self.called: set[str] = set()  # blocks elaborated at least once
        #: repeat(..., share=true | v) being elaborated, outermost first: (frames outside it, its attribute,
        #: the span of its share= option, the attribute of the repeat that computed v or None for share=true,
        #: a one-element list counting the layers tied so far); with share=true a layer of step i > 0 is tied
        #: to the same layer of step 0, with share=v every layer to the same layer of the same step of v's
        #: repeat (a layer that repeat lacks keeps its own parameters)
        self.shared_repeats: list[tuple[tuple[Frame, ...], str, Span, str | None, list[int]]] = []
        #: the step count of every repeat elaborated so far, by (frames outside it, its attribute)
        self.repeat_steps: dict[tuple[tuple[Frame, ...], str], int] = {}
        #: the node ids of the values repeat(..., stack=true) returned (the concat of the steps, or the one
        #: step's unsqueeze), which share=v may name whole or indexed
        self.stacked: set[int] = set()
        self.layers: dict[tuple[str, ...], int] = {}  # module path of each layer with parameters -> node id

    # -- locations ---------------------------------------------------------------------------
    def origin(self, *path: Any) -> TextOrigin:
        o = self.doc.origins.get(tuple(path))
        if o is None:
            s = self.doc.span(tuple(path))
            return TextOrigin(s.file, s.line, s.col, False)
        return o

    def fail(self, span: Span, message: str, *notes: str) -> _Poison:
        for name, text in getattr(self, "expr_like", {}).items():  # `vocab: alphabet + 3` under params:
            if f"the string {text!r}" in message:
                notes += (f"params.{name} is the string {text!r}; to compute it from other params, declare it under "
                          f"'derived:' ({name}: {text})",)
        self.errors.error(span, message, *notes)
        return POISON

    # -- entry -------------------------------------------------------------------------------
    def run(self) -> Graph:
        self.bind_params()
        self.bind_derived()
        self.import_modules()
        self.declare_dims()
        self.declare_inputs()
        self.read_blocks()
        top = _Scope(())
        top.env.update({name: POISON for name in self.spec.inputs})  # inputs whose type failed
        top.env.update({name: TV(Ref(nid), self.graph.node(nid).type) for name, nid in self.graph.inputs})
        body = parse(self.spec.graph, self.origin("graph"), "body", self.errors)
        if body is not None:
            self.check_order(body, set(top.env), self.doc.key_span(("graph",)))
            self.exec_body(body, top, in_block=None)
        self.bind_outputs(top, complete=body is not None and body.names_known)
        self.check_unused_blocks()
        if body is not None:
            self.apply_freeze()
        if not self.errors:
            self.check_symbols_known()
        self.graph.params = dict(self.params)
        self.graph.dims = dict(self.symbols)
        if not self.errors:
            self.check_example_sizes()
        self.errors.raise_if_any(self.sources)
        return self.graph

    def check_example_sizes(self) -> None:
        """At the example sizes every dimension must be at least 1: `specc check` counts there and
        example_inputs() runs there, so a conv1d of kernel 5 over an example T of 3 (length T - 4 = -1) is
        an error at the node that first has the dimension."""
        bindings = self.graph.example_bindings()
        at = ", ".join(f"{k}={v}" for k, v in bindings.items())
        for nid, axis, d, value in self.graph.nonpositive_dims(bindings):
            node = self.graph.node(nid)
            need = smallest_size(d, bindings)
            self.fail(node.span, f"at the example sizes ({at}) dimension {axis} of this {node.op}'s output, {d}, is "
                                 f"{value}", *([f"{need[0]} must be at least {need[1]} here; give it a larger example "
                                              f"under dims: ({need[0]}: {{example: {need[1]}}})"] if need else []))

    # -- params and overrides ----------------------------------------------------------------
    def bind_params(self) -> None:
        # entries of the spec left out for an error are unknown values, not undefined names
        self.params = {name: POISON for section, name in self.src.unknown
                       if section in ("params", "derived", "dims", "inputs")}
        self.params.update(self.spec.params)
        self.parse_derived()
        overrides = dict(self.overrides)
        if self.spec.scales:
            self.apply_scale(overrides)
        for name, value in overrides.items():
            text, span = self.override_text.get(name, (None, Span(API_OVERRIDES, 0, 0)))
            derived = name in self.derived_exprs and name not in self.spec.params
            if name not in self.params or derived:
                if span.line >= 1:  # the name's part of `--set name=value`
                    span = Span(span.file, span.line, 1, span.line, len(name) + 1)
                if derived:
                    self.fail(span, f"'{name}' is a derived param and cannot be set: {self.derived_text(name)}",
                              *self.derived_notes(name))
                    continue
                self.fail(span, f"unknown parameter '{name}' in override" + did_you_mean(name, self.params),
                          f"parameters of {self.spec.name}: {', '.join(self.params) or 'none'}")
                continue
            default = self.params[name]
            if default is POISON:
                continue
            try:
                self.params[name] = coerce_override(value, default)
            except ValueError as e:
                self.fail(span, f"bad override for '{name}': {e}")

    def apply_scale(self, overrides: dict[str, Any]) -> None:
        """Check the presets of `scales:` and apply the one the param `scale` selects (its override,
        else params.scale); removes `scale` from `overrides`, whose single params then win."""
        presets: dict[str, dict[str, Any]] = {}
        for preset, values in self.spec.scales.items():
            problem = identifier_problem(preset)
            if problem:
                self.fail(self.doc.key_span(("scales", preset)), f"scales: preset name: {problem}")
                continue
            checked: dict[str, Any] = {}
            for key, value in values.items():
                kspan = self.doc.key_span(("scales", preset, key))
                if key == "scale":
                    self.fail(kspan, f"scales.{preset}: a preset cannot set 'scale', which selects the preset")
                elif key in self.derived_exprs and key not in self.spec.params:
                    self.fail(kspan, f"scales.{preset}: '{key}' is a derived param and cannot be set: "
                                     f"{self.derived_text(key)}", *self.derived_notes(key))
                elif key not in self.params:
                    self.fail(kspan, f"scales.{preset}: unknown parameter '{key}'" + did_you_mean(key, self.params),
                              "a preset overrides parameters declared under 'params:'")
                elif self.params[key] is not POISON:
                    try:
                        checked[key] = coerce_override(value, self.params[key])
                    except ValueError as e:
                        self.fail(self.doc.span(("scales", preset, key)), f"scales.{preset}.{key}: {e}")
            presets[preset] = checked
        if "scale" in overrides:
            chosen = overrides.pop("scale")
            span = self.override_text.get("scale", (None, Span(API_OVERRIDES, 0, 0)))[1]
        elif "scale" in self.spec.params:
            chosen, span = self.spec.params["scale"], self.doc.span(("params", "scale"))
        else:
            return  # no preset selected: the params as declared
        names = ", ".join(self.spec.scales)
        if isinstance(chosen, str):
            chosen = chosen.strip()
        if not isinstance(chosen, str) or chosen not in self.spec.scales:
            shown = f"'{chosen}'" if isinstance(chosen, str) else _kind(chosen)
            self.fail(span, f"unknown scale {shown}: 'scale' selects one of the presets under 'scales:'"
                      + (did_you_mean(chosen, self.spec.scales) if isinstance(chosen, str) else ""),
                      f"presets: {names}")
            self.params["scale"] = POISON
            return
        self.params.update(presets.get(chosen, {}))
        self.params["scale"] = chosen

    # -- derived params ----------------------------------------------------------------------
    def parse_derived(self) -> None:
        """Parse every expression of `derived:` (name -> expression, None where it does not parse)."""
        self.derived_exprs: dict[str, A.Expr | None] = {}
        for name, text in self.spec.derived.items():
            self.derived_exprs[name] = parse(text, self.origin("derived", name), "expression", self.errors)
        #: string params that read as arithmetic on other params: a derived param written under params:
        self.expr_like: dict[str, str] = {}
        for name, text in self.spec.params.items():
            if isinstance(text, str) and len(text) <= 200 and any(c in text for c in "+-*/%("):
                expr = parse(text, self.origin("params", name), "expression", Collector())
                if expr is not None and any(n in self.spec.params for n in _value_names(expr)):
                    self.expr_like[name] = text

    def derived_text(self, name: str) -> str:
        """`derived.NAME = EXPR (at FILE:LINE:COL)`, for messages about a derived param."""
        return f"derived.{name} = {self.spec.derived[name]} (at {self.doc.span(('derived', name))})"

    def derived_notes(self, name: str) -> tuple[str, ...]:
        """A note naming the params a derived param is computed from (through other derived ones)."""
        roots: list[str] = []
        seen: set[str] = set()

        def visit(n: str) -> None:
            if n in seen:
                return
            seen.add(n)
            expr = self.derived_exprs.get(n)
            for used in (_value_names(expr) if expr is not None else ()):
                if used in self.spec.params and used not in roots:
                    roots.append(used)
                elif used in self.derived_exprs:
                    visit(used)

        visit(name)
        if not roots:
            return ()
        return (f"it derives from {', '.join(roots)}: set {'that' if len(roots) == 1 else 'those'} instead",)

    def bind_derived(self) -> None:
        """Evaluate `derived:` in order, after the overrides and the scale preset: each expression over the
        params and the derived params above it, with the graph's scalar arithmetic (never Python's eval)."""
        order = list(self.derived_exprs)
        for i, (name, expr) in enumerate(self.derived_exprs.items()):
            kspan = self.doc.key_span(("derived", name))
            if name in self.spec.params:
                self.fail(kspan, f"'{name}' is declared under both 'params:' and 'derived:'",
                          f"params.{name} is at {self.doc.key_span(('params', name))}")
                continue
            if name == "scale" and self.spec.scales:
                self.fail(kspan, "'scale' selects a preset of 'scales:' and cannot be derived")
                self.params[name] = POISON
                continue
            self.params[name] = POISON if expr is None else self.derived_value(name, expr, order[i + 1:])

    def derived_value(self, name: str, expr: A.Expr, later: list[str]) -> Any:
        where = f"derived.{name}"
        ok = True
        for sub in walk(expr):
            if isinstance(sub, A.Call):
                fname = sub.func_name
                if fname not in CONST_FUNCS:
                    ok = False
                    what = (f"'{fname}' is an operator" if fname and self.reserved_op(fname) else
                            f"unknown function '{fname}'" + did_you_mean(fname, CONST_FUNCS) if fname else
                            "only named functions can be called")
                    self.fail(sub.func.span, f"{where}: {what}; a derived param may call only "
                                             f"{', '.join(CONST_FUNCS)}")
                elif sub.kwargs:
                    ok = False
                    self.fail(sub.kwargs[0].span, f"{fname}() takes no keyword arguments")
            elif isinstance(sub, (A.Index, A.ListExpr)) and ok:  # once: [1][0] is both
                ok = False
                self.fail(sub.span, f"{where}: lists and indexing are not allowed in a derived param",
                          "a derived param is a number, a boolean or a string computed from params")
        for sub in _value_names(expr, spans=True):
            n = sub.id
            if n in self.params or n == "inf":
                continue
            ok = False
            if n == name:
                self.fail(sub.span, f"{where} refers to itself")
            elif n in later:
                cycle = self.derived_cycle(name, n)
                self.fail(sub.span, f"{where} uses '{n}', which is derived after it (at "
                                    f"{self.doc.key_span(('derived', n))}); a derived param may use the params and "
                                    f"the derived params above it",
                          *([f"'{name}' and '{n}' depend on each other: {' -> '.join(cycle)}"] if cycle else
                            [f"move '{n}' above '{name}'"]))
            elif n in self.spec.dims or n in self.spec.inputs:
                what = "a symbolic dimension" if n in self.spec.dims else "an input"
                self.fail(sub.span, f"{where}: '{n}' is {what}; a derived param is computed from params alone")
            else:
                usable = [k for k in self.params if k in self.spec.params or k in self.derived_exprs]
                self.fail(sub.span, f"unknown name '{n}' in {where}" + did_you_mean(n, usable),
                          f"names it may use (the params and the derived params above it): "
                          f"{', '.join(usable) or 'none'}")
        if not ok:
            return POISON
        v = self.const_eval(expr, "a number")
        if v is POISON:
            return POISON
        if isinstance(v, float) and not math.isfinite(v):
            return self.fail(expr.span, f"{where} is {v}; a param must be a finite number")
        if not isinstance(v, (bool, int, float, str)):
            return self.fail(expr.span, f"{where} must be a number, a boolean or a string, got {_kind(v)}")
        return v

    def derived_cycle(self, start: str, via: str) -> list[str]:
        """A chain start -> via -> ... -> start through the derived params' expressions, or []."""
        path = [start, via]
        seen = {via}
        while True:
            expr = self.derived_exprs.get(path[-1])
            if expr is None:
                return []
            names = [n for n in _value_names(expr) if n in self.derived_exprs]
            if start in names:
                return path + [start]
            nxt = next((n for n in names if n not in seen), None)
            if nxt is None:
                return []
            seen.add(nxt)
            path.append(nxt)

    # -- custom operators --------------------------------------------------------------------
    def import_modules(self) -> None:
        """Import the modules of `imports:` (which register custom operators), only if the user
        allowed every one of them; otherwise import nothing and report each refused one."""
        names = self.spec.imports
        seen: set[str] = set()
        refused = False
        for i, name in enumerate(names):
            span = self.doc.span(("imports", i))
            if name in seen:
                self.fail(span, f"module '{name}' is imported twice")
            seen.add(name)
            if name not in self.allow_imports:
                refused = True
                self.fail(span, f"the spec imports the Python module '{name}', which you have not allowed",
                          f"importing runs that module's code; allow it with `--allow-import {name}` "
                          f"(or specc.load(..., allow_imports=['{name}']))")
        if refused:
            self.import_failed = True
            return
        for i, name in enumerate(dict.fromkeys(names)):
            span = self.doc.span(("imports", names.index(name)))
            try:
                importlib.import_module(name)
            except (Exception, SystemExit) as e:  # user code: any failure is the user's, located at the import
                self.import_failed = True
                self.fail(span, f"cannot import module '{name}': {type(e).__name__}: {e}")
                continue
            self.imported.add(name)
            if not any(op.module and (op.module == name or op.module.startswith(name + "."))
                       for op in REGISTRY.values()):
                self.fail(span, f"module '{name}' defines no custom operators",
                          "declare them with @specc.custom_op(...) in that module")

    def visible_module(self, module: str | None) -> bool:
        """Whether operators registered by `module` may be used: built-ins always, custom ones
        when the spec imports their module (or a package above it)."""
        if module is None:
            return True
        return any(module == m or module.startswith(m + ".") for m in self.imported)

    def op_named(self, name: str) -> OpDef | None:
        """The operator a spec can call by `name` (not internal, and imported if custom), or None."""
        opdef = REGISTRY.get(name)
        if opdef is None or opdef.category == "internal" or not self.visible_module(opdef.module):
            return None
        return opdef

    def reserved_op(self, name: str) -> bool:
        """Whether `name` is an operator's (built-in, or custom and imported) and so cannot name a value."""
        opdef = REGISTRY.get(name)
        return opdef is not None and self.visible_module(opdef.module)

    # -- symbolic dimensions -----------------------------------------------------------------
    def declare_dims(self) -> None:
        for name, decl in self.spec.dims.items():
            if name in self.params:
                self.fail(self.doc.key_span(("dims", name)), f"'{name}' is both a parameter and a dimension")
                continue
            if isinstance(decl, int):
                if decl <= 0:
                    self.fail(self.doc.span(("dims", name)), f"dims.{name}: the example size must be positive, "
                                                             f"got {decl}")
                    continue
                decl = DimDecl(example=decl)
            if decl.example > MAX_SIZE or (isinstance(decl.max, int) and decl.max > MAX_SIZE):
                self.fail(self.doc.span(("dims", name)), f"dims.{name}: sizes must stay below 2**63")
                continue
            hi = decl.max
            if isinstance(hi, str):
                expr = parse(hi, self.origin("dims", name, "max"), "expression", self.errors)
                hi = self.const_eval(expr, "an integer") if expr is not None else None
                if hi is POISON:
                    hi = None
            if hi is not None and (not isinstance(hi, int) or isinstance(hi, bool) or hi < decl.min):
                self.fail(self.doc.span(("dims", name, "max")), f"dims.{name}.max must be an integer >= min")
                hi = None
            if decl.example < decl.min or (hi is not None and decl.example > hi):
                self.fail(self.doc.span(("dims", name)),
                          f"dims.{name}: the example {decl.example} is outside [{decl.min}, {hi if hi else 'inf'}]")
            self.symbols[name] = (decl.example, decl.min, hi)

    def const_eval(self, expr: A.Expr, want: str) -> Any:
        scope = _Scope(())
        v = self.ev(expr, scope, hint=None)
        if v is POISON:
            return POISON
        if _nodes_of_value(v):
            return self.fail(expr.span, f"expected {want} computed from params, not a tensor")
        return v

    def symbol(self, name: str, span: Span) -> Dim | _Poison:
        """The dimension for an undefined name in a type: a declared or new symbolic dimension."""
        if name in self.symbols:
            return Sym.of(name)
        hint = did_you_mean(name, self.params)
        if hint or name in RESERVED:
            return self.fail(span, f"unknown name '{name}' in a shape{hint}",
                             "declare it under 'dims:' to make it a symbolic dimension")
        if not check_identifier_ok(name):
            return self.fail(span, f"'{name}' cannot be a dimension name")
        self.symbols[name] = (DEFAULT_EXAMPLE.get(name, DEFAULT_SYMBOL_EXAMPLE), 1, None)
        return Sym.of(name)

    def eval_type(self, text: str, path: tuple, allow_range: bool) -> TensorType | _Poison:
        te = parse(text, self.origin(*path), "tensor_type", self.errors)
        if te is None:
            return POISON
        if te.dtype.id not in DTYPES:
            return self.fail(te.dtype.span, f"unknown dtype '{te.dtype.id}'" + did_you_mean(te.dtype.id, DTYPES),
                             f"dtypes: {', '.join(DTYPES)}")
        dims: list[Dim] = []
        scope = _Scope(())
        if len(te.dims) > MAX_RANK:
            return self.fail(te.dims[MAX_RANK].span, f"a type has {len(te.dims)} dimensions; at most {MAX_RANK} are "
                                                     f"allowed")
        for d in te.dims:
            if isinstance(d, A.Name) and d.id not in self.params:
                v = self.symbol(d.id, d.span)
            else:
                for sub in walk(d):
                    if isinstance(sub, A.Name) and sub.id not in self.params and sub.id not in self.symbols:
                        self.symbol(sub.id, sub.span)
                v = self.ev(d, scope, hint=None)
            if v is POISON:
                return POISON
            if not is_dim(v):
                return self.fail(d.span, f"a dimension must be an integer or a symbolic dimension, got {_kind(v)}")
            if isinstance(v, int) and v <= 0:
                return self.fail(d.span, f"a dimension must be positive, got {v}")
            if _too_large(tuple(dims) + (v,)):
                return self.fail(d.span, f"the dimension {fmt(v)} is too large "
                                         f"(sizes and element counts must stay below 2**63)")
            dims.append(v)
        rng = None
        if te.range is not None:
            if not allow_range:
                return self.fail(te.range.span, "a value range is only allowed on integer inputs")
            rng = self.eval_range(te.range, te.dtype.id)
            if rng is POISON:
                return POISON
        return TensorType(te.dtype.id, tuple(dims), rng)

    def eval_range(self, expr: A.Expr, dtype: str):
        if not (isinstance(expr, A.Call) and expr.func_name == "range" and not expr.kwargs and 1 <= len(expr.args) <= 2):
            return self.fail(expr.span, "expected 'range(hi)' or 'range(lo, hi)' after 'in'")
        if dtype not in ("i8", "i32", "i64", "u8"):
            return self.fail(expr.span, f"a value range needs an integer dtype, not {dtype}")
        vals = [self.const_eval(a, "an integer") for a in expr.args]
        if any(v is POISON for v in vals):
            return POISON
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            bad = next(v for v in vals if not isinstance(v, int) or isinstance(v, bool))
            return self.fail(expr.span, f"range bounds must be integers, got {_kind(bad)}")
        lo, hi = (0, vals[0]) if len(vals) == 1 else vals
        if hi <= lo:
            return self.fail(expr.span, f"empty range({lo}, {hi})")
        least, most = _INT_LIMITS[dtype]
        if lo < least or hi - 1 > most:
            return self.fail(expr.span, f"range({lo}, {hi}) does not fit {dtype}, whose values lie in "
                                        f"[{least}, {most}]")
        return (lo, hi)

    def declare_inputs(self) -> None:
        inputs = []
        for name, text in self.spec.inputs.items():
            t = self.eval_type(text, ("inputs", name), allow_range=True)
            if t is POISON:
                continue
            span = self.doc.key_span(("inputs", name))
            if name in self.params:
                self.fail(span, f"input '{name}' has the same name as a parameter")
                continue
            nid = self.graph.add(Node("input", (), (("name", name),), (t,), span, name=name))
            inputs.append((name, nid))
        for name, _ in inputs:  # a symbol may come from a later input's type
            if name in self.symbols:
                self.fail(self.doc.key_span(("inputs", name)), f"input '{name}' has the same name as a "
                                                               f"symbolic dimension used in the input types")
        self.graph.inputs = tuple((name, nid) for name, nid in inputs if name not in self.symbols)

    # -- blocks ------------------------------------------------------------------------------
    def read_blocks(self) -> None:
        for section, name in self.src.unknown:  # left out for an error: calls to it are no further error
            if section == "blocks" and not self.reserved_op(name):
                span = self.doc.span(("blocks",))
                self.blocks[name] = Block(A.Signature(A.Name(name, span), (), span), None, span)
        for key, body_text in self.spec.blocks.items():
            sig = parse(key, self.origin("blocks", key, "<key>"), "signature", self.errors)
            if sig is None:
                m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", key)
                if m and m.group(1) not in self.blocks and not self.reserved_op(m.group(1)):
                    span = self.doc.key_span(("blocks", key))
                    self.blocks[m.group(1)] = Block(A.Signature(A.Name(m.group(1), span), (), span), None, span)
                continue
            name = sig.name.id
            problem = self.name_problem(name, kind="block")
            if problem:
                self.fail(sig.name.span, problem)
                if not self.reserved_op(name) and name not in self.blocks:  # calls to it are no further error
                    self.blocks[name] = Block(sig, None, sig.span)
                continue
            if name in self.blocks:
                self.fail(sig.name.span, f"block '{name}' is defined twice")
                continue
            seen = set()
            for p in sig.params:
                if p.name.id in seen:
                    self.fail(p.name.span, f"parameter '{p.name.id}' of block '{name}' is repeated")
                seen.add(p.name.id)
                problem = identifier_problem(p.name.id)
                if problem:
                    self.fail(p.name.span, f"block argument: {problem}")
                elif p.name.id in self.symbols:
                    self.fail(p.name.span,
                              f"block argument '{p.name.id}' has the same name as a symbolic dimension")
            body = parse(body_text, self.origin("blocks", key), "body", self.errors)
            if body is not None:
                self.check_order(body, {p.name.id for p in sig.params}, sig.span)
            self.blocks[name] = Block(sig, body, sig.span)

    def name_problem(self, name: str, kind: str) -> str | None:
        problem = identifier_problem(name)
        if problem:
            return f"{kind} name: {problem}"
        if self.reserved_op(name):
            return f"'{name}' is {'a built-in' if REGISTRY[name].module is None else 'a custom'} operator and " \
                   f"cannot name a {kind}"
        if name in self.params:
            return f"'{name}' is a parameter and cannot name a {kind}"
        return None

    # -- statements --------------------------------------------------------------------------
    def check_order(self, body: A.Body, predefined: set[str], span: Span) -> None:
        """Report names used before their definition, naming a cycle when there is one."""
        defined = set(predefined)
        first_def: dict[str, A.Stmt] = {}
        for st in body.stmts:
            if isinstance(st, A.Assign):
                for t in st.targets:
                    first_def.setdefault(t.id, st)
        deps = nx.DiGraph()
        for st in body.stmts:
            if isinstance(st, A.Assign):
                for t in st.targets:
                    for n in _free_names(st.value):
                        deps.add_edge(t.id, n)
        self._late: dict[tuple[int, int, str], str] = getattr(self, "_late", {})
        for st in body.stmts:
            values = st.values if isinstance(st, A.Return) else (st.value,)
            for v in values:
                for sub in walk(v):
                    if isinstance(sub, A.Name) and sub.id not in defined and sub.id in first_def:
                        later = first_def[sub.id]
                        note = f"'{sub.id}' is assigned at {later.span}; statements run top to bottom"
                        if isinstance(st, A.Assign):
                            try:
                                cycle = nx.find_cycle(deps, sub.id)
                                names = [e[0] for e in cycle] + [cycle[0][0]]
                                if any(t.id in names for t in st.targets):
                                    note = "cycle: " + " -> ".join(names)
                            except nx.NetworkXNoCycle:
                                pass
                        self._late[(sub.span.line, sub.span.col, sub.id)] = note
            if isinstance(st, A.Assign):
                defined.update(t.id for t in st.targets)

    def exec_body(self, body: A.Body, scope: _Scope, in_block: Block | None) -> Any:
        result: Any = None
        returned = False
        for name in body.broken:  # assigned on a line with a syntax error: unknown, not undefined
            scope.env[name] = POISON
        scope.lenient = scope.lenient or not body.names_known
        for st in body.stmts:
            if returned:
                self.fail(st.span, "statement after 'return' is never run")
                break
            if isinstance(st, A.Return):
                if in_block is None:
                    self.fail(st.span, "'return' is only allowed in blocks; the graph's results are its 'outputs:'")
                    continue
                vals = [self.ev(v, scope, hint=None) for v in st.values]
                result = vals[0] if len(vals) == 1 else tuple(vals)
                returned = True
                continue
            self.exec_assign(st, scope)
        if in_block is not None and not returned:
            if not body.complete:  # the return may be on a line with a syntax error
                return POISON
            return self.fail(in_block.sig.span, f"block '{in_block.sig.name.id}' has no 'return' statement")
        return result

    def exec_assign(self, st: A.Assign, scope: _Scope) -> None:
        ok = True
        for t in st.targets:
            problem = None
            if not check_identifier_ok(t.id):
                problem = identifier_problem(t.id)
            elif t.id in self.params:
                problem = f"'{t.id}' is a parameter; choose another name for this value"
            elif t.id in self.symbols:
                problem = f"'{t.id}' is a symbolic dimension; choose another name for this value"
            elif t.id in self.blocks or self.reserved_op(t.id):
                problem = f"'{t.id}' names {'a block' if t.id in self.blocks else 'an operator'}; choose another name"
            if problem:
                self.fail(t.span, problem)
                ok = False
        hint = ",".join(t.id for t in st.targets)
        value = self.ev(st.value, scope, hint=hint, direct=True) if ok else POISON
        if len(st.targets) == 1:
            scope.env[st.targets[0].id] = value
            return
        if value is not POISON:
            if not isinstance(value, tuple):
                value = self.fail(st.value.span, f"cannot unpack one value into {len(st.targets)} names")
            elif len(value) != len(st.targets):
                value = self.fail(st.value.span,
                                  f"cannot unpack {len(value)} values into {len(st.targets)} names")
        for i, t in enumerate(st.targets):
            scope.env[t.id] = POISON if value is POISON else value[i]

    # -- expressions -------------------------------------------------------------------------
    def is_unknown(self, name: A.Name, scope: _Scope) -> bool:
        """Whether `name` is defined nowhere (nor later in its body, nor possibly on a broken line)."""
        n = name.id
        return not (n in scope.env or n in self.params or n in self.symbols or n in self.blocks
                    or self.reserved_op(n) or n in DTYPES or n in CONST_FUNCS or n in ("identity", "repeat", "inf")
                    or scope.lenient or (name.span.line, name.span.col, n) in getattr(self, "_late", {}))

    def unknown_operator(self, func: A.Name) -> _Poison:
        if self.import_failed:  # it may be a custom operator of the module that was not imported
            return POISON
        custom = REGISTRY.get(func.id)
        if custom is not None and custom.module is not None:
            return self.fail(func.span, f"'{func.id}' is a custom operator of module '{custom.module}', which this "
                                        f"spec does not import", f"add `imports: [{custom.module}]` to the spec")
        callables = set(self.blocks) | set(CONST_FUNCS) | {"repeat"}
        callables |= {k for k in REGISTRY if self.op_named(k)}
        return self.fail(func.span, f"unknown operator '{func.id}'" + did_you_mean(func.id, callables),
                         "operators are listed by `specc ops`; blocks are defined under 'blocks:'")

    def lookup(self, name: A.Name, scope: _Scope) -> Any:
        n = name.id
        if n in scope.env:
            return scope.env[n]
        if n in self.params:
            return self.params[n]
        if n in self.symbols:
            return Sym.of(n)
        if n in self.blocks:
            return BlockRef(n)
        if self.op_named(n):
            return OpRef(n)
        if n in DTYPES:
            return DTypeRef(n)
        if n == "identity":
            return OpRef("identity")
        if n == "inf":  # infinity, e.g. where(mask, scores, -inf)
            return math.inf
        late = getattr(self, "_late", {}).get((name.span.line, name.span.col, n))
        if late:
            return self.fail(name.span, f"'{n}' is used before it is defined", late)
        if scope.lenient:
            return POISON
        values = set(scope.env) | set(self.params) | set(self.symbols)
        # comparisons (eq, lt, ...) are written as operators; their two-letter names would match too much
        callables = set(self.blocks) | {k for k, v in REGISTRY.items()
                                        if v.category != "comparison" and self.op_named(k)}
        hint = did_you_mean(n, values) or did_you_mean(n, callables)  # a value is the likelier intent
        return self.fail(name.span, f"undefined name '{n}'" + hint)

    def ev(self, e: A.Expr, scope: _Scope, hint: str | None, direct: bool = False) -> Any:
        if self.depth >= MAX_EVAL_DEPTH:
            return self.fail(e.span, f"expressions and block calls nest more than {MAX_EVAL_DEPTH} levels deep")
        self.depth += 1
        try:
            return self.ev_inner(e, scope, hint, direct)
        except RecursionError:  # a last resort when the caller's own stack is already deep
            return self.fail(e.span, "expressions and block calls nest too deeply to check")
        finally:
            self.depth -= 1

    def ev_inner(self, e: A.Expr, scope: _Scope, hint: str | None, direct: bool) -> Any:
        if isinstance(e, A.Const):
            return e.value
        if isinstance(e, A.Name):
            return self.lookup(e, scope)
        if isinstance(e, A.ListExpr):
            items = [self.ev(i, scope, hint=None) for i in e.items]
            if any(i is POISON for i in items):
                return POISON
            return tuple(items) if e.tuple_ else list(items)
        if isinstance(e, A.Unary):
            v = self.ev(e.operand, scope, hint=None)
            return self.unary(e, v, scope)
        if isinstance(e, A.BinOp):
            if e.op in ("and", "or"):
                left = self.ev(e.left, scope, hint=None)
                if left is POISON:
                    return POISON
                if isinstance(left, TV):  # on bool tensors: elementwise, both sides evaluated
                    return self.logical(e, left, self.ev(e.right, scope, hint=None), scope, hint if direct else None)
                if not isinstance(left, bool):
                    return self.fail(e.left.span, f"'{e.op}' needs booleans, got {_kind(left)}")
                if (e.op == "and" and not left) or (e.op == "or" and left):
                    return left
                right = self.ev(e.right, scope, hint=None)
                if right is not POISON and not isinstance(right, bool):
                    return self.fail(e.right.span, f"'{e.op}' needs booleans, got {_kind(right)}")
                return right
            left = self.ev(e.left, scope, hint=None)
            right = self.ev(e.right, scope, hint=None)
            return self.binary(e, left, right, scope, hint if direct else None)
        if isinstance(e, A.IfExp):
            cond = self.condition(e, scope)
            return cond if cond is POISON else self.ev(e.then if cond else e.other, scope, hint, direct)
        if isinstance(e, A.Index):
            return self.index(e, scope, hint if direct else None)
        if isinstance(e, A.Call):
            return self.call(e, scope, hint if direct else None)
        return self.fail(getattr(e, "span", Span("?", 0, 0)), "unsupported expression")  # pragma: no cover

    def unary(self, e: A.Unary, v: Any, scope: _Scope) -> Any:
        if v is POISON:
            return POISON
        if e.op == "not":
            if isinstance(v, TV):
                return self.make("logical_not", {"x": v}, {}, e.span, scope, None, {"x": e.operand.span})
            if not isinstance(v, bool):
                return self.fail(e.span, f"'not' needs a boolean, got {_kind(v)}")
            return not v
        if isinstance(v, TV):
            return v if e.op == "+" else self.make("neg", {"x": v}, {}, e.span, scope, None, {})
        if isinstance(v, bool) or not (is_dim(v) or isinstance(v, float)):
            return self.fail(e.span, f"unary '{e.op}' needs a number or a tensor, got {_kind(v)}")
        return -v if e.op == "-" else v

    def binary(self, e: A.BinOp, a: Any, b: Any, scope: _Scope, hint: str | None) -> Any:
        if a is POISON or b is POISON:
            return POISON
        if isinstance(a, TV) or isinstance(b, TV):
            if e.op == "@":
                if not (isinstance(a, TV) and isinstance(b, TV)):
                    return self.fail(e.span, "'@' needs two tensors")
                return self.make("matmul", {"x": a, "y": b}, {}, e.span, scope, hint, {"x": e.left.span, "y": e.right.span})
            opname = _ops.BINARY_OPS.get(e.op)
            if opname is None:
                return self.fail(e.span, f"operator '{e.op}' is not defined for tensors")
            spans = {"x": e.left.span, "y": e.right.span}
            if opname in ("floordiv", "mod") and isinstance(a, TV) and a.type.dtype in _ops.INT_DTYPES \
                    and type(b) is int and b == 0:  # torch raises for an integer division by zero
                what = "division" if e.op == "//" else "remainder"
                return self.fail(e.right.span, f"integer {what} by zero: '{e.op}' of the integer tensor "
                                               f"{_ops.shape_str(a.type)} by the constant 0")
            a = self.as_tensor(a, b, e.left.span, scope)
            b = self.as_tensor(b, a, e.right.span, scope)
            if a is POISON or b is POISON:
                return POISON
            return self.make(opname, {"x": a, "y": b}, {}, e.span, scope, hint, spans)
        try:
            return const_arith(e.op, a, b)
        except ValueError as err:
            return self.fail(e.span, str(err))

    def logical(self, e: A.BinOp, a: TV, b: Any, scope: _Scope, hint: str | None) -> Any:
        """`a and b`, `a or b` on tensors: logical_and / logical_or (bool tensors, elementwise)."""
        if b is POISON:
            return POISON
        if not isinstance(b, TV):
            return self.fail(e.right.span, f"'{e.op}' with a tensor on the left needs a tensor on the right, "
                                           f"got {_kind(b)}")
        return self.make(f"logical_{e.op}", {"x": a, "y": b}, {}, e.span, scope, hint,
                         {"x": e.left.span, "y": e.right.span})

    def as_tensor(self, v: Any, other: Any, span: Span, scope: _Scope) -> Any:
        """A Python number next to a tensor becomes a `scalar` node of a matching dtype."""
        if isinstance(v, TV):
            return v
        if isinstance(v, bool) or not (isinstance(v, (int, float))):
            if isinstance(v, Sym):
                return self.fail(span, f"a symbolic dimension ({v}) cannot be used as a tensor value")
            return self.fail(span, f"expected a tensor or a number, got {_kind(v)}")
        odt = other.type.dtype if isinstance(other, TV) else "f32"
        dtype = odt if (isinstance(v, int) or odt in _ops.FLOAT_DTYPES) else "f32"
        if dtype == "bool":
            dtype = "i64" if isinstance(v, int) else "f32"
        lo, hi = INT_RANGES.get(dtype, (None, None))
        if lo is not None and not lo <= v < hi:
            return self.fail(span, f"the integer {v} does not fit the dtype {dtype} (range({lo}, {hi}))")
        return self.make("scalar", {}, {"value": v, "dtype": dtype}, span, scope, None, {})

    def index(self, e: A.Index, scope: _Scope, hint: str | None) -> Any:
        v = self.ev(e.value, scope, hint=None)
        if v is POISON:
            return POISON
        if isinstance(v, (tuple, list)):
            if len(e.items) != 1 or isinstance(e.items[0], (A.Slice, A.Ellipsis_)):
                return self.fail(e.span, "a tuple takes one integer index")
            i = self.ev(e.items[0], scope, hint=None)
            if i is POISON:
                return POISON
            if not isinstance(i, int) or isinstance(i, bool) or not -len(v) <= i < len(v):
                return self.fail(e.items[0].span, f"index {i} is out of range for {len(v)} values")
            return v[i]
        if not isinstance(v, TV):
            return self.fail(e.value.span, f"cannot index {_kind(v)}")
        items = []
        item_spans: list = []  # where each of items is written ('...': its span for every dimension it takes)
        newaxes: list[int] = []  # x[:, None]: positions of new size-1 dimensions in the result
        dots = [i for i in e.items if isinstance(i, A.Ellipsis_)]
        if len(dots) > 1:
            return self.fail(dots[1].span, "an index can have only one '...'")
        for item in e.items:
            if isinstance(item, A.Ellipsis_):  # the dimensions the other indices leave, whole
                named = sum(1 for i in e.items if not isinstance(i, A.Ellipsis_)
                            and not (isinstance(i, A.Const) and i.value is None))
                if named > v.type.rank:
                    return self.fail(e.span, f"index: too many indices ({named}, besides '...' and the new "
                                             f"axes) for {_plain(v.type)}")
                items.extend([("slice", None, None)] * (v.type.rank - named))
                item_spans.extend([item.span] * (v.type.rank - named))
                continue
            if isinstance(item, A.Slice):
                bounds = []
                for b in (item.start, item.stop):
                    bv = None if b is None else self.ev(b, scope, hint=None)
                    if bv is POISON:
                        return POISON
                    if bv is not None and not is_dim(bv):
                        return self.fail(b.span, f"slice bounds must be integers, got {_kind(bv)}")
                    bounds.append(bv)
                step = 1 if item.step is None else self.ev(item.step, scope, hint=None)
                if step is POISON:
                    return POISON
                number = isinstance(step, int) and not isinstance(step, bool)
                if not number or step <= 0:
                    note = "torch's slices take no negative steps either: an index cannot reverse a dimension"
                    return self.fail(item.step.span, f"slice steps must be positive integers, got {_kind(step)}",
                                     *([note] if number and step < 0 else []))
                if step > 2 ** 62:  # torch's int64 length arithmetic (length + step - 1) overflows beyond
                    return self.fail(item.step.span, f"slice steps must be at most 2**62, got {step} (a step as large "
                                                     f"as the dimension already takes its first entry alone)")
                # step 1 stays ('slice', start, stop): graphs and their keys read as before strides
                items.append(("slice", bounds[0], bounds[1]) + ((step,) if step != 1 else ()))
                item_spans.append(item.span)
            else:
                iv = self.ev(item, scope, hint=None)
                if iv is POISON:
                    return POISON
                if iv is None:
                    newaxes.append(len(newaxes) + sum(1 for it in items if it[0] == "slice"))
                    continue
                if not isinstance(iv, int) or isinstance(iv, bool):
                    return self.fail(item.span, f"indices must be integers (or none for a new axis), got {_kind(iv)}")
                items.append(("int", iv))
                item_spans.append(item.span)
        # an error about one dimension points at its item (getitem's OpError arg "index[axis]")
        where = {"index": e.span, **{f"index[{axis}]": sp for axis, sp in enumerate(item_spans)}}
        if not newaxes:
            return self.make("getitem", {"x": v}, {"index": tuple(items)}, e.span, scope, hint, where)
        if len(items) > v.type.rank:
            return self.fail(e.span, f"index: too many indices ({len(items)}, besides the new axes) for "
                                     f"{_plain(v.type)}")
        rank = v.type.rank - sum(1 for it in items if it[0] == "int") + len(newaxes)
        if rank > MAX_RANK:
            return self.fail(e.span, f"index: the result would have {rank} dimensions; at most {MAX_RANK} are "
                                     f"allowed")
        if any(it != ("slice", None, None) for it in items):  # x[0, None]: index first, then add the axes
            v = self.make("getitem", {"x": v}, {"index": tuple(items)}, e.span, scope, None, where)
            if v is POISON:
                return POISON
        for i, axis in enumerate(newaxes):  # increasing positions of the result: each lands where written
            v = self.make("unsqueeze", {"x": v}, {"dim": axis}, e.span, scope,
                          hint if i == len(newaxes) - 1 else None, {"dim": e.span})
            if v is POISON:
                return POISON
        return v

    # -- calls -------------------------------------------------------------------------------
    def call(self, e: A.Call, scope: _Scope, hint: str | None) -> Any:
        if not isinstance(e.func, A.Name):
            return self.fail(e.func.span, "only named operators and blocks can be called")
        fname = e.func.id
        if fname == "repeat":
            return self.repeat(e, scope, hint)
        if fname in CONST_FUNCS and fname not in scope.env:
            args = [self.ev(a, scope, hint=None) for a in e.args]
            if any(a is POISON for a in args):
                return POISON
            if fname in REGISTRY and any(_nodes_of_value(a) for a in args):
                return self.apply_op(REGISTRY[fname], args, {}, e, scope, hint)  # e.g. sqrt(tensor)
            if e.kwargs:
                return self.fail(e.kwargs[0].span, f"{fname}() takes no keyword arguments")
            try:
                return CONST_FUNCS[fname](*args)
            except (TypeError, ValueError, OverflowError) as err:
                return self.fail(e.span, f"{fname}(): {err}")
        if fname in self.blocks:
            target: Any = BlockRef(fname)
        elif self.op_named(fname):
            target = OpRef(fname)
        elif self.is_unknown(e.func, scope):
            target = self.unknown_operator(e.func)
        else:
            target = self.lookup(e.func, scope)
        if target is POISON:
            for a in e.args:
                self.ev(a, scope, hint=None)  # still report errors inside the arguments
            for k in e.kwargs:
                if k.name not in ("init", "bias_init"):  # initialisers are not values
                    self.ev(k.value, scope, hint=None)
            return POISON
        options: dict[str, tuple[Any, Span]] = {}
        if isinstance(target, OpRef) and target.name in REGISTRY:
            e, options = self.call_options(REGISTRY[target.name], e, scope)
        args = [self.ev(a, scope, hint=None) for a in e.args]
        kwargs = {}
        opdef = REGISTRY[target.name] if isinstance(target, OpRef) and target.name in REGISTRY else None
        for k in e.kwargs:
            if k.name in kwargs:
                return self.fail(k.span, f"argument '{k.name}' is given twice")
            arg = opdef.arg(k.name) if opdef is not None else None
            if arg is not None and arg.kind == "str" and arg.choices and isinstance(k.value, A.Name) \
                    and self.is_unknown(k.value, scope):
                kwargs[k.name] = k.value.id  # mode=bilinear: a choice written bare, as act=gelu is (or a typo of one)
                continue
            kwargs[k.name] = self.ev(k.value, scope, hint=None)
        if isinstance(target, OpRef) and target.name in REGISTRY:
            # argument names and kinds are checked even when some values are unknown
            return self.apply_op(REGISTRY[target.name], args, kwargs, e, scope, hint, options)
        if any(v is POISON for v in args) or any(v is POISON for v in kwargs.values()):
            return POISON
        if isinstance(target, BlockRef):
            attr = hint if hint and "," not in hint else target.name
            return self.call_block(self.blocks[target.name], args, kwargs, e, scope, scope.claim(attr), None)
        if isinstance(target, OpRef) and target.name in REGISTRY:
            return self.apply_op(REGISTRY[target.name], args, kwargs, e, scope, hint)
        return self.fail(e.func.span, f"'{fname}' is {_kind(target)}, not an operator or a block")

    # -- call options: frozen=, init=, bias_init=, share= ------------------------------------
    def call_options(self, opdef: OpDef, e: A.Call, scope: _Scope) -> tuple[A.Call, dict[str, tuple[Any, Span]]]:
        """Strip the call options from `e` (those that are not the op's own arguments) and evaluate
        them; returns the call without them and {option: (value, span)} of the valid ones."""
        own = {a.name for a in opdef.args}
        picked = [k for k in e.kwargs if k.name in CALL_OPTIONS and k.name not in own]
        if not picked:
            return e, {}
        e = dataclasses.replace(e, kwargs=tuple(k for k in e.kwargs if not any(k is p for p in picked)))
        if opdef.params is None:
            for k in picked:
                self.fail(k.span, f"{opdef.name}() owns no parameters, so '{k.name}=' does not apply",
                          "frozen=, init=, bias_init= and share= are options of layers with parameters "
                          "(linear, conv2d, embedding, layer_norm, attention, ...)")
            return e, {}
        options: dict[str, tuple[Any, Span]] = {}
        seen: set[str] = set()
        for k in picked:
            if k.name in seen:
                self.fail(k.span, f"argument '{k.name}' is given twice")
                continue
            seen.add(k.name)
            if k.name in ("init", "bias_init"):
                v = self.initialiser(k.value, scope, k.name)
            else:
                v = self.ev(k.value, scope, hint=None)
                if v is POISON:
                    continue
                if k.name == "frozen" and not isinstance(v, bool):
                    v = self.fail(k.value.span, f"frozen= must be true or false, got {_kind(v)}")
                elif k.name == "share" and not isinstance(v, TV):
                    v = self.fail(k.value.span, f"share= needs a value computed by another {opdef.name} layer, "
                                                f"got {_kind(v)}")
                elif k.name == "init_from" and not isinstance(v, TV):
                    v = self.fail(k.value.span, f"init_from= needs a value computed by a layer with parameters, "
                                                f"got {_kind(v)}")
            if v is not POISON:
                options[k.name] = (v, k.span)
        return e, options

    def condition(self, e: A.IfExp, scope: _Scope) -> bool | _Poison:
        """The condition of `a if cond else b`: a boolean computed from params."""
        cond = self.ev(e.cond, scope, hint=None)
        if cond is POISON or isinstance(cond, bool):
            return cond
        return self.fail(e.cond.span, f"the condition of 'if' must be a boolean computed from params, "
                                      f"got {_kind(cond)}")

    def initialiser(self, expr: A.Expr, scope: _Scope, option: str) -> Init | _Poison:
        """An initialiser expression: zeros, ones, eye, normal(std, mean=0), uniform(bound),
        constant(value), or `a if cond else b` of these; arguments are computed from params."""
        known = "normal(std, mean=0), uniform(bound), constant(value), zeros, ones, eye"
        if isinstance(expr, A.IfExp):
            cond = self.condition(expr, scope)
            return cond if cond is POISON else self.initialiser(expr.then if cond else expr.other, scope, option)
        if isinstance(expr, A.Name):
            func, args, kwargs = expr, (), ()
        elif isinstance(expr, A.Call) and isinstance(expr.func, A.Name):
            func, args, kwargs = expr.func, expr.args, expr.kwargs
        else:
            return self.fail(expr.span, f"{option}= expects an initialiser: {known}")
        kind = func.id
        if kind not in INITIALISERS:
            return self.fail(func.span, f"unknown initialiser '{kind}'" + did_you_mean(kind, INITIALISERS),
                             f"initialisers: {known}")
        names = INITIALISERS[kind]
        if len(args) > len(names):
            return self.fail(expr.span, f"{kind} takes {len(names) or 'no'} argument{'s' if len(names) != 1 else ''}"
                                        f", got {len(args)}", f"initialisers: {known}")
        values: dict[str, Any] = {}
        for name, a in zip(names, args):
            values[name] = (self.const_eval(a, "a number"), a.span)
        for k in kwargs:
            if k.name not in names or k.name in values:
                return self.fail(k.span, f"{kind}() has no argument '{k.name}'" if k.name not in names
                                 else f"{kind}() got argument '{k.name}' twice", f"initialisers: {known}")
            values[k.name] = (self.const_eval(k.value, "a number"), k.value.span)
        if kind == "normal":
            values.setdefault("mean", (0.0, expr.span))
        out = []
        for name in names:
            if name not in values:
                return self.fail(expr.span, f"{kind}() is missing argument '{name}'", f"initialisers: {known}")
            v, vspan = values[name]
            if v is POISON:
                return POISON
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return self.fail(vspan, f"{kind}(): '{name}' must be a number, got {_kind(v)}")
            if name in ("std", "bound") and v < 0:
                return self.fail(vspan, f"{kind}(): '{name}' must not be negative, got {v:g}")
            out.append(float(v))
        return Init(kind, tuple(out))

    def apply_options(self, opname: str, params: tuple[ParamSpec, ...],
                      options: dict[str, tuple[Any, Span]]) -> tuple[ParamSpec, ...]:
        """The parameters of a new `opname` node with its call options applied (errors reported)."""
        if not params:
            for name, (_, span) in options.items():
                self.fail(span, f"{opname}: this call creates no parameters (e.g. affine=false), so '{name}=' "
                                f"does not apply")
            return params
        own = [p for p in params if not p.buffer]
        if "share" in options:
            v, span = options["share"]
            for other in ("init", "bias_init", "frozen", "init_from"):
                if other in options:
                    self.fail(options[other][1], f"{other}= cannot be combined with share=: the parameters are those "
                                                 f"of the shared layer (set {other}= there)")
            return self.share(opname, params, v, span)
        if "init_from" in options:
            v, span = options["init_from"]
            for other in ("init", "bias_init"):
                if other in options:
                    self.fail(options[other][1], f"{other}= cannot be combined with init_from=: every parameter "
                                                 f"starts as a copy of the other layer's")
            params = self.init_from(opname, params, v, span)
        params = list(params)
        for option, prefix in (("init", "weight"), ("bias_init", "bias")):
            if option not in options:
                continue
            init, span = options[option]
            targets = [i for i, p in enumerate(params) if not p.buffer and p.name.split(".")[-1].startswith(prefix)]
            if not targets:
                self.fail(span, f"{opname}: this layer has no {prefix} for {option}= to initialise"
                          + (" (bias=false?)" if prefix == "bias" else ""),
                          "its parameters: " + ", ".join(_param_text(p) for p in own))
                continue
            if init.kind == "eye":
                bad = [params[i] for i in targets
                       if len(params[i].shape) != 2 or params[i].shape[0] != params[i].shape[1]]
                if bad:
                    self.fail(span, f"{option}=eye needs square 2-D weights, but {opname} has "
                                    + ", ".join(_param_text(p) for p in bad))
                    continue
            for i in targets:
                params[i] = dataclasses.replace(params[i], init=init)
        if "frozen" in options and options["frozen"][0]:
            params = [dataclasses.replace(p, frozen=True) for p in params]
        return tuple(params)

    def param_spec(self, full: str) -> ParamSpec | None:
        """The parameter of the graph so far with the full name `full` (module path and local name)."""
        for _, node in self.graph.nodes():
            for p in node.params:
                if ".".join(node.path + (p.name,)) == full:
                    return p
        return None

    def share(self, opname: str, params: tuple[ParamSpec, ...], v: "TV", span: Span) -> tuple[ParamSpec, ...]:
        """`params` tied to those of the layer that computed `v` (same op and parameter shapes)."""
        owner = self.graph.node(v.ref.node)
        if owner.op != opname or not owner.params:
            what = f"'{owner.op}', which has no parameters" if not owner.params else f"'{owner.op}'"
            self.fail(span, f"share=: the value was computed by {what}; a {opname} layer can only share the "
                            f"parameters of another {opname} layer", f"that value is computed at {owner.span}")
            return params
        if any(p.tied_to for p in params):
            self.fail(span, "share= cannot be combined with tie=; share= already reuses every parameter")
            return params
        mine = [(p.name, p.shape, p.dtype) for p in params]
        theirs = [(p.name, p.shape, p.dtype) for p in owner.params]
        if mine != theirs:
            notes = [f"that layer is at {owner.span}"]
            if [m[:2] for m in mine] == [t[:2] for t in theirs]:
                notes.append("a layer's float parameters take the dtype of its input, and shared parameters have "
                             "one storage: share= needs inputs of one dtype (cast(x, dtype) converts one)")
            self.fail(span, f"share=: this {opname} would have parameters {_params_text(params)}, but the one it "
                            f"shares ('{'.'.join(owner.path)}') has {_params_text(owner.params)}", *notes)
            return params
        return tuple(dataclasses.replace(p, tied_to=q.tied_to or ".".join(owner.path + (q.name,)),
                                         frozen=q.frozen, init=q.init)
                     for p, q in zip(params, owner.params))

    def init_from(self, opname: str, params: tuple[ParamSpec, ...], v: "TV", span: Span) -> tuple[ParamSpec, ...]:
        """`params` initialised as copies of the same-named parameters of the layer that computed `v`: of
        the same shape, or of this shape without its first dimension (then one copy per leading index,
        e.g. per expert of a moe_mlp copied from an mlp). The storage stays separate (unlike share=)."""
        owner = self.graph.node(v.ref.node)
        where = f"that value is computed at {owner.span}"
        if not owner.params:
            self.fail(span, f"init_from=: the value was computed by '{owner.op}', which has no parameters to copy",
                      where)
            return params
        theirs = {q.name: q for q in owner.params if not q.buffer}
        out = []
        for p in params:
            q = theirs.get(p.name)
            if p.buffer:
                out.append(p)
                continue
            # a copy has storage of its own: a float parameter may start from one of another float dtype
            # (cast when the weights are made), e.g. an f64 layer copying an f32 one
            same_kind = q is not None and (q.dtype == p.dtype or {q.dtype, p.dtype} <= FLOAT_DTYPES)
            if q is None or (q.shape != p.shape and q.shape != p.shape[1:]) or not same_kind:
                have = "no parameter of that name" if q is None else _param_text(q)
                self.fail(span, f"init_from=: this {opname} has parameter {_param_text(p)}, but the {owner.op} "
                                f"'{'.'.join(owner.path)}' it copies has {have}; each parameter must match a "
                                f"same-named one of the same shape (or of the shape without the first dimension)",
                          f"its parameters: {_params_text(owner.params)}; {where}")
                return params
            source = q.tied_to or ".".join(owner.path + (q.name,))  # a copy of a copy copies the copy
            out.append(dataclasses.replace(p, init=Init("copy", (), source)))
        return tuple(out)

    # -- freeze: ------------------------------------------------------------------------------
    def apply_freeze(self) -> None:
        """Mark the parameters matching the `freeze:` patterns frozen. A tied parameter shares its
        owner's storage, so matching it freezes the owner (and with it every layer sharing it)."""
        patterns = self.spec.freeze
        if not patterns:
            return
        names = [".".join(node.path + (p.name,)) for _, node in self.graph.nodes() for p in node.params]
        stored = [".".join(node.path + (p.name,)) for _, node in self.graph.nodes() for p in node.params
                  if p.tied_to is None]
        tied = tied_names(self.graph)
        frozen: set[str] = set()
        for k, pattern in enumerate(patterns):
            chosen = select(pattern, stored, tied)
            if chosen.partial:
                self.fail(self.doc.span(("freeze", k)), *partial_tie_message("freeze", pattern, chosen.partial, tied))
                continue
            if not chosen.hits:
                literal = pattern.replace("*", "").replace("?", "")
                close = difflib_close(literal, names)
                self.fail(self.doc.span(("freeze", k)), f"freeze: the pattern '{pattern}' matches no parameter",
                          ("close names: " + ", ".join(close)) if close else
                          "parameter names are module paths such as h.0.attention.q.weight (see `specc ir`)")
                continue
            frozen.update(chosen.hits)
        for nid, node in list(self.graph.nodes()):
            if not node.params:
                continue
            params = tuple(dataclasses.replace(p, frozen=True)
                           if (p.tied_to or ".".join(node.path + (p.name,))) in frozen else p for p in node.params)
            if params != node.params:  # a new payload; the graph is still being built
                self.graph.g.nodes[nid][NODE] = node.replace(params=params)

    def bind(self, opdef: OpDef, args: list, kwargs: dict, e: A.Call) -> tuple[dict, dict] | None:
        """Match call arguments to the signature; returns (values, spans) by argument name."""
        values: dict[str, Any] = {}
        spans: dict[str, Span] = {}
        pos = list(zip(args, e.args))
        params = list(opdef.args)
        for i, a in enumerate(params):
            if a.variadic:
                rest = pos[i:]
                if len(rest) == 1 and isinstance(rest[0][0], (list, tuple)):
                    values[a.name] = list(rest[0][0])
                else:
                    values[a.name] = [v for v, _ in rest]
                if rest:
                    spans[a.name] = rest[0][1].span.merge(rest[-1][1].span)
                    _item_spans(spans, a.name, rest[0][1] if len(rest) == 1 else [x for _, x in rest])
                pos = []
                break
            if i < len(pos):
                values[a.name], spans[a.name] = pos[i][0], pos[i][1].span
                _item_spans(spans, a.name, pos[i][1])
        else:
            if len(pos) > len(params):
                extra = e.args[len(params)]
                self.fail(extra.span, f"{opdef.name}() takes at most {len(params)} positional arguments, "
                                      f"got {len(pos)}", f"signature: {opdef.signature()}")
                return None
        for k in e.kwargs:
            a = opdef.arg(k.name)
            if a is None:
                self.fail(k.span, f"{opdef.name}() has no argument '{k.name}'"
                          + did_you_mean(k.name, [x.name for x in opdef.args]), f"signature: {opdef.signature()}")
                return None
            if k.name in values:
                self.fail(k.span, f"{opdef.name}() got argument '{k.name}' twice")
                return None
            values[k.name], spans[k.name] = kwargs[k.name], k.span
            _item_spans(spans, k.name, k.value)
        for a in opdef.args:
            if a.name not in values:
                if a.required and not a.variadic:
                    self.fail(e.span, f"{opdef.name}() is missing argument '{a.name}'",
                              f"signature: {opdef.signature()}")
                    return None
                values[a.name] = [] if a.variadic else a.default
        return values, spans

    def apply_op(self, opdef: OpDef, args: list, kwargs: dict, e: A.Call, scope: _Scope, hint: str | None,
                 options: dict[str, tuple[Any, Span]] | None = None) -> Any:
        bound = self.bind(opdef, args, kwargs, e)
        if bound is None:
            return POISON
        values, spans = bound
        tensors, attrs = {}, {}
        ok = True
        numbers = _ops.NUMBER_ARGS.get(opdef.name, ())
        if numbers:  # e.g. where(mask, x, 0.0): a number beside a tensor becomes a scalar of its dtype
            other = next((values[n] for n in numbers if isinstance(values.get(n), TV)), None)
            for n in numbers:
                v = values.get(n)
                if isinstance(v, float) and not math.isfinite(v) and (opdef.name, n) not in INFINITE_TENSOR_OK:
                    values[n] = self.fail(spans.get(n, e.span), f"{opdef.name}(): argument '{n}' must be a finite "
                                                                f"number, got {v}")
                    continue
                if _num(v) and not isinstance(v, Sym):
                    values[n] = self.as_tensor(v, other, spans.get(n, e.span), scope)
        for a in opdef.args:
            v = values[a.name]
            if v is POISON or (isinstance(v, (list, tuple)) and any(x is POISON for x in v)):
                ok = False  # already reported
                continue
            span = spans.get(a.name, e.span)
            checked = self.check_kind(opdef, a, v, span)
            if checked is POISON:
                ok = False
                continue
            (tensors if a.is_tensor else attrs)[a.name] = checked
        if not ok:
            return POISON
        return self.make(opdef.name, tensors, attrs, e.span, scope, hint, spans, options)

    def check_kind(self, opdef: OpDef, a: Arg, v: Any, span: Span) -> Any:
        where = f"{opdef.name}(): argument '{a.name}'"
        k = a.kind
        if k == "tensor":
            return v if isinstance(v, TV) else self.fail(span, f"{where} must be a tensor, got {_kind(v)}")
        if k == "tensor?":
            return v if v is None or isinstance(v, TV) else self.fail(span, f"{where} must be a tensor, got {_kind(v)}")
        if k == "tensors":
            if isinstance(v, (list, tuple)) and all(isinstance(x, TV) for x in v):
                return list(v)
            return self.fail(span, f"{where} must be a list of tensors, e.g. [a, b]")
        if k != "owner" and (isinstance(v, TV) or (isinstance(v, (list, tuple)) and any(isinstance(x, TV) for x in v))):
            return self.fail(span, f"{where} must be a value computed from params, not a tensor")
        if v is None and a.default is None:
            return None
        if k == "int":
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, Sym):
                return self.fail(span, f"{where} must be a fixed integer, but {v} is a symbolic dimension")
            return self.fail(span, f"{where} must be an integer, got {_kind(v)}")
        if k == "dim":
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            return v if is_dim(v) else self.fail(span, f"{where} must be an integer or a dimension, got {_kind(v)}")
        if k in ("float", "number"):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if isinstance(v, float) and not math.isfinite(v) and (opdef.name, a.name) not in INFINITE_OK:
                    return self.fail(span, f"{where} must be a finite number, got {v}")
                return float(v) if k == "float" else v
            return self.fail(span, f"{where} must be a number, got {_kind(v)}")
        if k == "bool":
            return v if isinstance(v, bool) else self.fail(span, f"{where} must be true or false, got {_kind(v)}")
        if k == "str":
            if isinstance(v, OpRef):
                v = v.name
            if not isinstance(v, str):
                return self.fail(span, f"{where} must be a string, got {_kind(v)}")
            if a.choices and v not in a.choices:
                return self.fail(span, f"{where} must be one of {', '.join(map(repr, a.choices))}, got {v!r}"
                                 + did_you_mean(v, a.choices))
            return v
        if k == "op":
            name = v.name if isinstance(v, OpRef) else v
            if not isinstance(name, str) or (a.choices and name not in a.choices):
                return self.fail(span, f"{where} must be one of {', '.join(a.choices)}, got "
                                       f"{name if isinstance(name, str) else _kind(v)}"
                                 + (did_you_mean(name, a.choices) if isinstance(name, str) else ""))
            return name
        if k == "dtype":
            name = v.name if isinstance(v, DTypeRef) else v
            if not isinstance(name, str) or name not in DTYPES:
                return self.fail(span, f"{where} must be a dtype ({', '.join(DTYPES)}), got {_kind(v)}")
            return name
        if k == "axis":
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            return self.fail(span, f"{where} must be an integer dimension index, got {_kind(v)}")
        if k == "axes":
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                return tuple(v)
            return self.fail(span, f"{where} must be a dimension index or a list of them, got {_kind(v)}")
        if k == "dims":
            out = []
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, float) and x.is_integer():
                    x = int(x)
                if not is_dim(x):
                    return self.fail(span, f"{where} must be sizes (integers or dimensions), got {_kind(x)}")
                out.append(x)
            return tuple(out)
        if k == "owner":
            if not isinstance(v, TV):
                return self.fail(span, f"{where} must be a value computed by a layer with a weight, got {_kind(v)}")
            owner = self.graph.node(v.ref.node)
            weight = next((p for p in owner.params if p.name == "weight"), None)
            if weight is None:
                return self.fail(span, f"{where}: the value was computed by '{owner.op}', which has no weight")
            if weight.tied_to is not None:
                return (weight.tied_to, weight.shape)
            return (".".join(owner.path + ("weight",)), weight.shape)
        if k == "any":
            if isinstance(v, list):
                return tuple(v)
            return v
        raise AssertionError(f"unknown argument kind {k}")  # pragma: no cover

    def make(self, opname: str, tensors: dict, attrs: dict, span: Span, scope: _Scope, hint: str | None,
             spans: dict[str, Span], options: dict[str, tuple[Any, Span]] | None = None) -> Any:
        """Run the op's rules and add its node. Returns a TV, or a tuple of TVs for several outputs."""
        opdef = REGISTRY[opname]
        types = {k: (None if v is None else [x.type for x in v] if isinstance(v, list) else v.type)
                 for k, v in tensors.items()}
        bounds = {s: (lo, hi) for s, (_, lo, hi) in self.symbols.items()}
        call = OpCall(opname, types, attrs, bounds)
        try:
            outs = opdef.infer(call)
            outs = outs if isinstance(outs, tuple) else (outs,)
            params = opdef.layer_params(call)
        except OpError as err:  # at the argument named (an item of a list argument: "xs[2]", else the list)
            where = spans.get(err.arg, spans.get(err.arg.split("[")[0], span)) if err.arg else span
            return self.fail(where, err.message)
        for p in params:  # tie=: one storage, so one dtype (a layer's float parameters take its input's)
            owner = self.param_spec(p.tied_to) if p.tied_to else None
            if owner is not None and owner.dtype != p.dtype:
                return self.fail(spans.get("tie", span),
                                 f"{opname}: cannot tie this layer's {_param_text(p)} to {p.tied_to}, of dtype "
                                 f"{owner.dtype}: its float parameters take the dtype of its input, and tied "
                                 f"parameters share one storage",
                                 f"cast the input to {owner.dtype} (cast(x, {owner.dtype})), or drop tie=")
        if options:
            params = self.apply_options(opname, params, options)
        for t in outs:
            if t.rank > MAX_RANK:
                return self.fail(span, f"{opname}: the result would have {t.rank} dimensions; at most {MAX_RANK} "
                                       f"are allowed")
            if _too_large(t.shape):
                return self.fail(span, f"{opname}: the result {_plain(t)} is too large "
                                       f"(sizes and element counts must stay below 2**63)")
        if len(self.graph) >= MAX_NODES:
            self.too_big = True
            return self.fail(span, f"the model has more than {MAX_NODES} operations once blocks and repeats "
                                   f"are expanded", "reduce repeat counts or the number of layers")
        inputs: list[Ref] = []
        reads: list[str | None] = []  # the block argument each input is, if it is one of this instance's
        for a in opdef.tensor_args:
            v = tensors.get(a.name)
            for x in v if isinstance(v, list) else [] if v is None else [v]:
                inputs.append(x.ref)
                reads.append(x.arg[1] if x.arg is not None and x.arg[0] == scope.frames else None)
        stored = []
        for a in opdef.args:
            if a.is_tensor:
                if a.kind == "tensors":
                    stored.append((f"{a.name}#", len(tensors[a.name])))
                elif a.kind == "tensor?":
                    stored.append((f"{a.name}?", tensors[a.name] is not None))
            else:
                stored.append((a.name, attrs[a.name]))
        name = hint or opname
        path = scope.path + (scope.claim(name if "," not in name else opname, opname),) if params else ()
        if params and self.shared_repeats:
            params = self.share_step(opname, params, path, scope, span)
            if params is POISON:
                return POISON
        node = Node(opname, tuple(inputs), tuple(stored), outs, span, name=name, scope=scope.frames,
                    params=params, path=path)
        nid = self.graph.add(node)
        if params:
            self.layers[path] = nid
        for slot, arg in enumerate(reads):
            if arg is not None:
                self.graph.arg_reads[(nid, slot)] = arg
        if len(outs) == 1:
            return TV(Ref(nid, 0), outs[0])
        return tuple(TV(Ref(nid, i), t) for i, t in enumerate(outs))

    # -- blocks and repetition ---------------------------------------------------------------
    def call_block(self, block: Block, args: list, kwargs: dict, e: A.Call, scope: _Scope, attr: str,
                   index: int | None) -> Any:
        name = block.sig.name.id
        if name in self.stack:
            return self.fail(e.span, f"block '{name}' calls itself (through {' -> '.join(self.stack + [name])})")
        if len(self.stack) >= MAX_BLOCK_DEPTH:
            return self.fail(e.span, f"blocks call blocks more than {MAX_BLOCK_DEPTH} levels deep")
        self.called.add(name)
        if block.body is None:
            return POISON
        params = block.sig.params
        if len(args) > len(params):
            return self.fail(e.span, f"block '{name}' takes {len(params)} arguments, got {len(args)}",
                             f"defined at {block.span}")
        env: dict[str, Any] = {}
        for p, v in zip(params, args):
            env[p.name.id] = v
        for k, v in kwargs.items():
            if k not in {p.name.id for p in params}:
                kspan = next((kw.span for kw in e.kwargs if kw.name == k), e.span)
                return self.fail(kspan, f"block '{name}' has no argument '{k}'"
                                 + did_you_mean(k, [p.name.id for p in params]), f"defined at {block.span}")
            if k in env:
                kspan = next((kw.span for kw in e.kwargs if kw.name == k), e.span)
                return self.fail(kspan, f"block '{name}' got argument '{k}' twice")
            env[k] = v
        for p in params:
            if p.name.id not in env:
                if p.default is None:
                    return self.fail(e.span, f"block '{name}' is missing argument '{p.name.id}'",
                                     f"defined at {block.span}")
                env[p.name.id] = self.ev(p.default, _Scope(()), hint=None)
        inner = _Scope(scope.frames + (Frame(name, attr, index),), env=env)
        for p in params:  # declaration order; each argument tagged so reads of it know which it was
            k, v = p.name.id, env[p.name.id]
            if isinstance(v, TV):
                if v.arg is not None and v.arg[0] == scope.frames:
                    self.graph.arg_passes[(inner.frames, k)] = v.arg[1]
                env[k] = TV(v.ref, v.type, (inner.frames, k))
        self.graph.block_args[inner.frames] = tuple((p.name.id, env[p.name.id].ref) for p in params
                                                    if isinstance(env[p.name.id], TV))
        self.stack.append(name)
        try:
            before = len(self.errors.diagnostics)
            result = self.exec_body(block.body, inner, in_block=block)
            for i in range(before, len(self.errors.diagnostics)):  # the call chain, innermost block first
                d = self.errors.diagnostics[i]
                at = next((j for j, n in enumerate(d.notes) if n.startswith("in block")), None)
                if at is None:
                    self.errors.diagnostics[i] = d.with_note(f"in block '{name}' called at {e.span}")
                else:
                    notes = list(d.notes)
                    notes[at] += f", in block '{name}' called at {e.span}"
                    self.errors.diagnostics[i] = dataclasses.replace(d, notes=tuple(notes))
        finally:
            self.stack.pop()
        return result

    def repeat(self, e: A.Call, scope: _Scope, hint: str | None) -> Any:
        """repeat(n, block, x, ..., share=false, stack=false, k=v, ...): the block applied n times, each
        step taking the values the step before returned (keywords other than the options go to every
        step). share=true: every step reuses the parameters of step 0 (each layer of step i is tied to the
        same layer of step 0, as share= ties one layer). stack=true: instead of the last step's values,
        each carried value of every step, stacked along a new leading axis of size n (step i at index i)."""
        if len(e.args) < 3:
            return self.fail(e.span, "repeat(n, block, x, ...) needs a count, a block and at least one value")
        n = self.ev(e.args[0], scope, hint=None)
        blk = self.ev(e.args[1], scope, hint=None)
        carried = [self.ev(a, scope, hint=None) for a in e.args[2:]]
        kwargs: dict[str, Any] = {}
        options: dict[str, tuple[Any, Span]] = {}
        for k in e.kwargs:
            v = self.ev(k.value, scope, hint=None)
            if k.name in kwargs or k.name in options:
                v = self.fail(k.span, f"argument '{k.name}' is given twice")
            if k.name not in REPEAT_OPTIONS:
                kwargs[k.name] = v
                continue
            if v is not POISON and not isinstance(v, bool) and not (k.name == "share" and isinstance(v, TV)):
                v = self.fail(k.value.span, f"repeat: {k.name}= must be true or false"
                                            f"{' (or a value of an earlier repeat)' if k.name == 'share' else ''}, "
                                            f"got {_kind(v)}", f"{k.name}=true {REPEAT_OPTIONS[k.name]}")
            options[k.name] = (v, k.span)
        if n is POISON or blk is POISON or any(v is POISON for v in carried + list(kwargs.values())) \
                or any(v is POISON for v, _ in options.values()):
            return POISON
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return self.fail(e.args[0].span, f"repeat count must be a non-negative integer, got {_kind(n)}")
        if n > MAX_REPEAT:
            return self.fail(e.args[0].span, f"repeat count {n} is too large (at most {MAX_REPEAT})")
        if not isinstance(blk, BlockRef):
            return self.fail(e.args[1].span, f"repeat needs a block name, got {_kind(blk)}")
        block = self.blocks[blk.name]
        taken = [k for k in options if k in {p.name.id for p in block.sig.params}]
        for k in taken:
            self.fail(options[k][1], f"repeat: '{k}=' is repeat's own option, so it cannot pass block '{blk.name}' "
                                     f"its argument '{k}'", f"rename that argument of the block (defined at "
                                                            f"{block.span})")
        if taken:
            return POISON
        share, share_span = options.get("share", (False, e.span))
        stack = options.get("stack", (False, e.span))[0]
        if stack and n == 0:
            return self.fail(e.args[0].span, "repeat(..., stack=true) needs at least one step: zero steps "
                                             "stack to nothing")
        source = None
        if isinstance(share, TV):
            source = self.shared_source(share, n, scope, share_span)
            if source is POISON:
                return POISON
        attr = scope.claim(hint if hint and "," not in hint else blk.name)
        self.repeat_steps[(scope.frames, attr)] = n
        state = tuple(carried)
        steps: list[tuple[Any, ...]] = []
        tied = [0]
        if share is not False:
            self.shared_repeats.append((scope.frames, attr, share_span, source, tied))
        try:
            for i in range(n):
                out = self.call_block(block, list(state), kwargs, e, scope, attr, i)
                if out is POISON or self.too_big:
                    return POISON
                out = out if isinstance(out, tuple) else (out,)
                if len(out) != len(state):
                    return self.fail(e.span, f"block '{blk.name}' returns {len(out)} values but repeat carries "
                                             f"{len(state)}; a repeated block must return what it takes")
                state = out
                steps.append(out)
        finally:
            if share is not False:
                self.shared_repeats.pop()
        if source is not None and n and not tied[0]:
            return self.fail(share_span, f"repeat(..., share={source}): no layer of block '{blk.name}' matches a "
                                         f"layer of the repeat '{source}' (layers match by their path inside the "
                                         f"step, e.g. 'attention' or 'ffn'), so nothing would be shared",
                             "name the shared layers alike in both blocks (the name a layer's value is assigned to)")
        if stack:
            return self.stack_steps(steps, e, scope, hint, blk.name)
        return state[0] if len(state) == 1 else state

    def stack_steps(self, steps: list[tuple[Any, ...]], e: A.Call, scope: _Scope, hint: str | None,
                    name: str) -> Any:
        """repeat(..., stack=true): each carried value of every step stacked along a new axis 0 (an unsqueeze
        per step and a concat: values the unrolled steps already compute)."""
        targets = hint.split(",") if hint and len(hint.split(",")) == len(steps[0]) else [None] * len(steps[0])
        out = []
        for j, target in enumerate(targets):
            values = [s[j] for s in steps]
            if any(v is POISON for v in values):  # an error inside the block, reported already
                return POISON
            if not all(isinstance(v, TV) for v in values):
                return self.fail(e.span, f"repeat(..., stack=true): block '{name}' returns {_kind(values[0])} as "
                                         f"value {j + 1}; only tensors can be stacked")
            for i, v in enumerate(values[1:], 1):
                if v.type != values[0].type:
                    return self.fail(e.span, f"repeat(..., stack=true): block '{name}' returns value {j + 1} as "
                                             f"{_plain(values[0].type)} at step 0 but as {_plain(v.type)} at step "
                                             f"{i}; stacked values need one type at every step")
            parts = [self.make("unsqueeze", {"x": v}, {"dim": 0}, e.span, scope, target if len(values) == 1 else None,
                               {"dim": e.span}) for v in values]
            if any(p is POISON for p in parts):
                return POISON
            if len(parts) > 1:
                parts = [self.make("concat", {"xs": parts}, {"dim": 0}, e.span, scope, target, {"xs": e.span})]
                if parts[0] is POISON:
                    return POISON
            self.stacked.add(parts[0].ref.node)
            out.append(parts[0])
        return out[0] if len(out) == 1 else tuple(out)

    def shared_source(self, v: "TV", n: int, scope: _Scope, span: Span) -> str | _Poison:
        """repeat(..., share=v): the attribute of the earlier repeat, in this scope, whose step computed v
        (its last step's value, as `g = repeat(...)` binds it); it must have run n steps."""
        nid = v.ref.node
        node = self.graph.node(nid)
        k = len(scope.frames)
        # a stack=true repeat's values (and a step picked out of them) are made outside its steps: from the
        # stack (or an index of it) to step 0's value, through the concat and the unsqueeze of each step
        if node.op == "getitem" and node.inputs and node.inputs[0].node in self.stacked:
            nid = node.inputs[0].node
            node = self.graph.node(nid)
        if nid in self.stacked:
            if node.op == "concat":
                node = self.graph.node(node.inputs[0].node)
            node = self.graph.node(node.inputs[0].node)
        frame = node.scope[k] if node.scope[:k] == scope.frames and len(node.scope) > k else None
        if frame is None and node.scope == scope.frames and node.op in ("getitem", "concat", "unsqueeze") \
                and node.inputs:
            inner = self.graph.node(node.inputs[0].node)
            if inner.scope[:k] == scope.frames and len(inner.scope) > k and inner.scope[k].index is not None:
                name = inner.scope[k].name
                what = {"getitem": "an index", "concat": "a concat", "unsqueeze": "an unsqueeze"}[node.op]
                return self.fail(span, f"repeat(..., share=v): v is {what} of '{name}', which is the last step's "
                                       f"value of a repeat; {what} of it picks no step (only the result of a "
                                       f"repeat(..., stack=true) is indexed by step)",
                                 f"write share={name} to reuse the layers of that repeat, step by step")
        if frame is None or frame.index is None or (scope.frames, frame.name) not in self.repeat_steps:
            return self.fail(span, "repeat(..., share=v): v must be a value computed inside an earlier repeat of "
                                   "this scope (its result, as `g = repeat(n, block, x)` binds it, stacked or not), "
                                   "whose layers this repeat's steps then reuse step by step",
                             "share=true makes the steps of this repeat reuse its own first step's layers")
        other = self.repeat_steps[(scope.frames, frame.name)]
        if other != n:
            return self.fail(span, f"repeat(..., share={frame.name}): '{frame.name}' ran {other} steps and this "
                                   f"repeat runs {n}; step i reuses the layers of step i, so the counts must agree")
        return frame.name

    def share_step(self, opname: str, params: tuple[ParamSpec, ...], path: tuple[str, ...], scope: _Scope,
                   span: Span) -> tuple[ParamSpec, ...] | _Poison:
        """The parameters of a new layer at `path` made inside shared repeats: tied to the same layer of step 0
        in a later step of a repeat(..., share=true), or to the same layer of the same step of the repeat that
        computed v under repeat(..., share=v) (a layer that repeat lacks is not matched there). Every shared
        repeat around the layer that matches it counts the match (a share=v repeat without any is an error);
        the outermost decides the tie, and since a matched layer carries its own ties (and frozen=,
        initialisers), every choice reaches the same storage."""
        decided = None
        for outer, attr, share_span, source, tied in self.shared_repeats:
            k = len(outer)
            if scope.frames[:k] != outer or len(scope.frames) <= k or scope.frames[k].name != attr:
                continue
            step = scope.frames[k].index
            if not step and source is None:
                continue
            at = sum(len(f.segments) for f in outer) + 1  # the step's index in the module path
            if source is None:
                first = path[:at] + ("0",) + path[at + 1:]
            else:  # the same step of the repeat that computed share=v
                first = path[:at - 1] + (source, str(step)) + path[at + 1:]
                if first not in self.layers:
                    continue
            nid = self.layers.get(first)
            owner = self.graph.node(nid) if nid is not None else None
            if owner is None or owner.op != opname or \
                    [(p.name, p.shape, p.dtype) for p in params] != [(q.name, q.shape, q.dtype) for q in owner.params]:
                have = (f"{_a(owner.op)} with parameters {_params_text(owner.params)}" if owner is not None
                        else "no layer")
                owner_step = "step 0" if source is None else f"step {step} of '{source}'"
                return self.fail(share_span, f"repeat(..., share={'true' if source is None else source}): step {step} "
                                             f"has {_a(opname)} '{'.'.join(path)}' with parameters "
                                             f"{_params_text(params)}, but {owner_step} has {have} at "
                                             f"'{'.'.join(first)}'; shared layers need the same op and parameter "
                                             f"shapes and dtypes", f"that layer is at {span}")
            tied[0] += 1
            if decided is None:
                decided = (first, owner)
        if decided is None:
            return params
        first, owner = decided
        return tuple(dataclasses.replace(p, tied_to=q.tied_to or ".".join(first + (q.name,)), frozen=q.frozen,
                                         init=q.init)
                     for p, q in zip(params, owner.params))

    def check_symbols_known(self) -> None:
        """Every symbolic dimension the graph uses must be readable from an input's shape at run time."""
        known: set[str] = set()
        part_of: dict[str, str] = {}  # a symbol read nowhere alone -> an input dimension it is part of
        for name, nid in self.graph.inputs:
            for d in self.graph.node(nid).type.shape:
                if not isinstance(d, Sym):
                    continue
                known |= d.symbols
                for s in d.symbols:
                    part_of.setdefault(s, f"{d} of input '{name}'")
        # a whole input dimension, or solved from one: a * S + b, a * S + (symbols already read)
        readable = readable_symbols(d for _, nid in self.graph.inputs for d in self.graph.node(nid).type.shape)
        reported: set[str] = set()
        for _, node in self.graph.nodes():
            used: set[str] = set()
            for t in node.outputs:
                used |= t.symbols()
            computed: set[str] = set()  # sizes the computation itself takes (a reshape's, arange's)
            for k, v in node.attrs:
                computed |= _attr_symbols(v)
            for s in sorted((used | computed) - known - reported):
                reported.add(s)
                self.fail(node.span, f"symbolic dimension '{s}' appears in no input's shape, so its value is "
                                     f"unknown when the model runs")
            for s in sorted(computed - readable - reported):
                reported.add(s)
                self.fail(node.span, f"symbolic dimension '{s}' is only part of an input dimension ({part_of[s]}), "
                                     f"so its value cannot be read when the model runs",
                          f"give an input a dimension {s} alone, or a * {s} + b with a and b numbers or sizes of "
                          f"symbols the inputs give")

    def check_unused_blocks(self) -> None:
        """Blocks the graph never calls get no shapes, but their unknown names are still errors."""
        for name, block in self.blocks.items():
            if name in self.called or block.body is None:
                continue
            body = block.body
            scope = _Scope((), env={p.name.id: POISON for p in block.sig.params}, lenient=not body.names_known)
            scope.env.update({n: POISON for n in body.broken})
            for st in body.stmts:
                if isinstance(st, A.Assign):
                    scope.env.update({t.id: POISON for t in st.targets})
            for st in body.stmts:
                for value in (st.values if isinstance(st, A.Return) else (st.value,)):
                    called = {id(c.func) for c in walk(value) if isinstance(c, A.Call)}
                    inits = {id(x) for c in walk(value) if isinstance(c, A.Call) for k in c.kwargs
                             if k.name in ("init", "bias_init") for x in walk(k.value)}  # not values
                    for sub in walk(value):
                        if isinstance(sub, A.Name) and id(sub) not in inits and self.is_unknown(sub, scope):
                            if id(sub) in called:
                                self.unknown_operator(sub)
                            else:
                                self.lookup(sub, scope)

    # -- outputs -----------------------------------------------------------------------------
    def bind_outputs(self, top: _Scope, complete: bool = True) -> None:
        """Bind the declared outputs; `complete` is False when the graph body could not be read
        in full (a syntax error), so that a missing output is not reported as undefined."""
        outputs = []
        training = set()
        for name, declared in self.spec.outputs.items():
            kspan = self.doc.key_span(("outputs", name))
            tpath: tuple = ("outputs", name)
            if isinstance(declared, OutputDecl):
                if declared.training_only:
                    training.add(name)
                declared, tpath = declared.type, ("outputs", name, "type")
            want = None if declared is None else self.eval_type(declared, tpath, allow_range=False)
            if name not in top.env:
                if complete:
                    self.fail(kspan, f"output '{name}' is not defined by the graph" + did_you_mean(name, top.env))
                continue
            v = top.env[name]
            if v is POISON:
                continue
            if not isinstance(v, TV):
                self.fail(kspan, f"output '{name}' must be a tensor, got {_kind(v)}")
                continue
            if want is not None and want is not POISON:
                self.check_output_type(name, want, v.type, self.doc.span(tpath), v.ref)
            outputs.append((name, v.ref))
        if self.spec.outputs and len(training) == len(self.spec.outputs):
            self.fail(self.doc.key_span(("outputs",)), "every output is training_only: a deploy build would "
                                                       "compute nothing")
        self.graph.outputs = tuple(outputs)
        self.graph.training_outputs = frozenset(training)

    def check_output_type(self, name: str, want: TensorType, got: TensorType, span: Span, ref: Ref) -> None:
        where = f"computed at {self.graph.node(ref.node).span}"
        if want.dtype != got.dtype:
            self.fail(span, f"output '{name}': declared dtype {want.dtype} but the graph computes {got.dtype}", where)
        elif want.rank != got.rank:
            self.fail(span, f"output '{name}': declared {want} (rank {want.rank}) but the graph computes "
                            f"{_plain(got)} (rank {got.rank})", where)
        else:
            for i, (a, b) in enumerate(zip(want.shape, got.shape)):
                if a != b:
                    self.fail(span, f"output '{name}': declared {want} but the graph computes {_plain(got)}: "
                                    f"dimension {i} is {fmt(b)}, declared {fmt(a)}", where)
                    break


# ---------------------------------------------------------------------------------------------
# constant helpers
# ---------------------------------------------------------------------------------------------

def _param_text(p: ParamSpec) -> str:
    return f"{p.name} {p.dtype}[{', '.join(map(str, p.shape))}]"


def _params_text(params) -> str:
    return "[" + ", ".join(_param_text(p) for p in params) + "]"


def difflib_close(name: str, candidates: Collection[str], n: int = 3) -> list[str]:
    """Up to `n` candidates close to `name`."""
    return difflib.get_close_matches(name, sorted(candidates), n=n, cutoff=0.5)


def smallest_size(d, bindings: Mapping[str, int], limit: int = 1 << 16) -> tuple[str, int] | None:
    """(symbol, the smallest value of it, from its binding up, at which `d` is at least 1) when `d` has one
    symbol and such a value below `limit` exists."""
    if len(d.symbols) != 1:
        return None
    (name,) = d.symbols
    for v in range(bindings[name], limit):
        if evaluate(d, {**bindings, name: v}) >= 1:
            return name, v
    return None


def _plain(t: TensorType) -> str:
    return str(TensorType(t.dtype, t.shape))


def _a(word: str) -> str:
    """'a linear', 'an attention'."""
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _kind(v: Any) -> str:
    if isinstance(v, TV):
        return f"a tensor {_plain(v.type)}"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"the integer {v}"
    if isinstance(v, float):
        return f"the number {v:g}"
    if isinstance(v, str):
        return f"the string {v!r}"
    if isinstance(v, Sym):
        return f"the dimension {v}"
    if v is None:
        return "none"
    if isinstance(v, BlockRef):
        return f"the block '{v.name}'"
    if isinstance(v, OpRef):
        return f"the operator '{v.name}'"
    if isinstance(v, DTypeRef):
        return f"the dtype {v.name}"
    if isinstance(v, (list, tuple)):
        return f"a list of {len(v)} values"
    return type(v).__name__




def _too_large(shape: tuple) -> bool:
    """Whether the fixed sizes of a shape, or their product, reach 2**63."""
    total = 1
    for d in shape:
        if isinstance(d, int):
            total *= max(d, 1)
            if total > MAX_SIZE:
                return True
    return False


def _num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or isinstance(v, Sym)


def const_arith(op: str, a: Any, b: Any) -> Any:
    """Arithmetic on compile-time values. `/` on integers stays an integer when it divides exactly."""
    if op in ("==", "!="):
        return (a == b) if op == "==" else (a != b)
    if op == "+" and isinstance(a, str) and isinstance(b, str):
        if len(a) + len(b) > _MAX_STR:
            raise ValueError(f"the string would be longer than {_MAX_STR} characters")
        return a + b
    if not (_num(a) and _num(b)):
        raise ValueError(f"operator '{op}' is not defined for {_kind(a)} and {_kind(b)}")
    if op in ("<", "<=", ">", ">="):
        if isinstance(a, Sym) or isinstance(b, Sym):
            raise ValueError("symbolic dimensions cannot be compared")
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    sym = isinstance(a, Sym) or isinstance(b, Sym)
    if sym:
        if isinstance(a, float) or isinstance(b, float):
            raise ValueError("a symbolic dimension can only be combined with integers")
        if op == "+":
            return _small(a + b)
        if op == "-":
            return _small(a - b)
        if op == "*":
            return _small(a * b)
        if op in ("/", "//"):
            q = div_exact(a, b)
            if q is None:
                raise ValueError(f"{fmt(a)} is not divisible by {fmt(b)}")
            return q
        raise ValueError(f"operator '{op}' is not defined for symbolic dimensions")
    try:
        r = _number_arith(op, a, b)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError("result out of range") from None
    if isinstance(r, complex) or (isinstance(r, float) and not math.isfinite(r)) or \
            (isinstance(r, int) and r.bit_length() > _MAX_INT_BITS):
        raise ValueError("result out of range")
    return r


_MAX_INT_BITS = 1024  # integers computed from params; far beyond any size, yet cheap to compute
_MAX_STR = 10_000  # strings computed from params
_MAX_TERMS, _MAX_DEGREE = 64, 16  # symbolic dimensions such as 2*B*T + 4


def _small(d: Any) -> Any:
    """`d` if it is a dimension of reasonable size, else ValueError (they can grow exponentially)."""
    if isinstance(d, Sym):
        if len(d.terms) > _MAX_TERMS or any(len(m) > _MAX_DEGREE for m, _ in d.terms) or \
                any(abs(c).bit_length() > _MAX_INT_BITS for _, c in d.terms):
            raise ValueError("the symbolic expression is too large")
    elif isinstance(d, int) and d.bit_length() > _MAX_INT_BITS:
        raise ValueError("result out of range")
    return d


def _number_arith(op: str, a: int | float, b: int | float) -> int | float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if isinstance(a, int) and isinstance(b, int) and b and a % b == 0:
            return a // b
        return a / b
    if op == "//":
        return a // b
    if op == "%":
        return a % b
    if op == "**":
        if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and \
                (b > _MAX_INT_BITS or (abs(a).bit_length() - 1) * b > _MAX_INT_BITS):
            raise OverflowError  # checked before computing: 10 ** 10 ** 10 would never finish
        return a ** b
    raise ValueError(f"operator '{op}' is not defined for numbers")


def _const_sqrt(x: Any) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or x < 0:
        raise ValueError("expects a non-negative number")
    return math.sqrt(x)


def _int(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
        raise ValueError(f"cannot convert {_kind(x)} to an integer")
    return int(x)


def _float(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"cannot convert {_kind(x)} to a number")
    try:
        return float(x)
    except OverflowError:
        raise ValueError("the integer is too large for a float") from None


def _minmax(f):
    def g(*xs):
        if not xs or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            raise ValueError("expects numbers")
        return f(xs)
    return g


CONST_FUNCS = {"min": _minmax(min), "max": _minmax(max), "int": _int, "float": _float, "sqrt": _const_sqrt}


def _attr_symbols(v: Any) -> set[str]:
    if isinstance(v, Sym):
        return set(v.symbols)
    if isinstance(v, (list, tuple)):
        out: set[str] = set()
        for x in v:
            out |= _attr_symbols(x)
        return out
    return set()


def _free_names(e: A.Expr) -> set[str]:
    return {s.id for s in walk(e) if isinstance(s, A.Name)}


def _item_spans(spans: dict[str, Span], name: str, given: "A.Expr | list[A.Expr]") -> None:
    """Where each item of argument `name` is, as spans["name[j]"] (an OpError may name "xs[2]"): the items
    of a list literal, or the values a variadic argument collected; nothing for any other expression."""
    items = given.items if isinstance(given, A.ListExpr) else given if isinstance(given, list) else []
    spans.update((f"{name}[{j}]", x.span) for j, x in enumerate(items))


def _value_names(e: A.Expr, spans: bool = False) -> list:
    """The names an expression reads as values (not the functions it calls), in order, each once;
    with `spans`, the Name nodes (every occurrence)."""
    called = {id(s.func) for s in walk(e) if isinstance(s, A.Call)}
    names = [s for s in walk(e) if isinstance(s, A.Name) and id(s) not in called]
    return names if spans else list(dict.fromkeys(s.id for s in names))


def identifier_problem(name: str) -> str | None:
    """Why `name` cannot name something in a spec, or None."""
    try:
        check_identifier(name)
        return None
    except ValueError as e:
        return str(e)


def check_identifier_ok(name: str) -> bool:
    try:
        check_identifier(name)
        return True
    except ValueError:
        return False


def coerce_override(value: Any, default: Any) -> Any:
    """Convert an override (a CLI string or a Python value) to the type of the parameter's default."""
    if isinstance(value, str) and not isinstance(default, str):
        text = value.strip()
        if isinstance(default, bool):
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if isinstance(default, int):
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        if isinstance(default, float):
            try:
                v = float(text)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
            if not math.isfinite(v):
                raise ValueError(f"expected a finite number, got {value!r}")
            return v
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if value.bit_length() > _MAX_INT_BITS:
            raise ValueError(f"the integer is too large (more than {_MAX_INT_BITS} bits)")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise ValueError("the number is too large") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def elaborate(src: SpecSource, overrides: Mapping[str, Any] | None = None,
              override_text: Mapping[str, tuple[str, Span]] | None = None,
              allow_imports: Collection[str] = ()) -> Graph:
    """Elaborate a validated spec into a typed Graph. Raises SpecError with every problem found.

    `allow_imports`: the modules of the spec's `imports:` the user allows to be imported (each
    runs as Python code); a spec importing any other module is an error, and nothing is imported."""
    with _fewer_collections():
        return Elaborator(src, overrides, override_text, allow_imports).run()


@contextlib.contextmanager
def _fewer_collections(first: int = 50_000):
    """CPython's cyclic garbage collector runs a young-generation pass every 700 new objects and scans
    the old ones every 100 such passes: building a 100000-node graph (the MAX_NODES bound) spent more
    than half its time there, on objects that all stay alive. A higher threshold while elaborating;
    the old one after (other threads' allocations meanwhile see it too, which only delays their
    collections)."""
    before = gc.get_threshold()
    gc.set_threshold(max(first, before[0]), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


__all__ = ["elaborate", "Elaborator", "OVERRIDES_FILE", "coerce_override", "Diagnostic", "SpecError", "REQUIRED"]
