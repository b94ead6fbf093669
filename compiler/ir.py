"""The typed graph IR.

A `Graph` holds immutable `Node` payloads in a networkx DiGraph (edges mirror each node's ordered
inputs). Nodes produce one or more tensors; a `Ref` names one of them. Parameters are declared on
the node that owns them (`ParamSpec`: shape, dtype, initialiser); their values live outside the IR.

Node payloads never mutate: `Node.replace(...)` returns a new node (or the same one when nothing
changes), and passes build new graphs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import networkx as nx

from .dims import Dim, Sym, evaluate, fmt, product, symbols
from specc.dsl.diagnostics import Span

#: Graph-level attribute keys, in one place (STYLE.md point 3).
NODE = "node"  # networkx node attribute holding the Node payload
SLOTS = "slots"  # networkx edge attribute: the input positions an edge feeds

DTYPES = {
    "f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64",
    "i8": "int8", "i32": "int32", "i64": "int64", "u8": "uint8", "bool": "bool",
}
FLOAT_DTYPES = frozenset({"f16", "bf16", "f32", "f64"})
INT_DTYPES = frozenset({"i8", "i32", "i64", "u8"})
#: The values each integer dtype holds, as half-open ranges.
INT_RANGES = {"u8": (0, 2 ** 8), "i8": (-2 ** 7, 2 ** 7), "i32": (-2 ** 31, 2 ** 31), "i64": (-2 ** 63, 2 ** 63)}
DTYPE_BYTES = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "i8": 1, "i32": 4, "i64": 8, "u8": 1, "bool": 1}


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[Dim, ...]
    #: For integer tensors with a finite domain: values lie in [lo, hi).
    value_range: tuple[int, int] | None = None

    @property
    def rank(self) -> int:
        return len(self.shape)

    def numel(self) -> Dim:
        return product(self.shape)

    def symbols(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for d in self.shape:
            out |= symbols(d)
        return out

    def concrete(self, bindings: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(evaluate(d, bindings) for d in self.shape)

    def __str__(self) -> str:
        s = f"{self.dtype}[{', '.join(fmt(d) for d in self.shape)}]"
        if self.value_range is not None:
            lo, hi = self.value_range
            s += f" in range({lo}, {hi})" if lo else f" in range({hi})"
        return s


@dataclass(frozen=True)
class Init:
    """A parameter initialiser: kind is one of uniform(bound), normal(std, mean), zeros, ones, constant,
    eye, or copy: the initial value of the parameter named `source` (full name), repeated along this
    parameter's extra leading dimension if it has one (`init_from=`: experts upcycled from a dense MLP)."""

    kind: str
    args: tuple[float, ...] = ()
    source: str | None = None

    def __str__(self) -> str:
        if self.kind == "copy":
            return f"copy({self.source})"
        return f"{self.kind}({', '.join(f'{a:g}' for a in self.args)})"


@dataclass(frozen=True)
class ParamSpec:
    name: str  # local name within its node, e.g. "weight"
    shape: tuple[int, ...]
    init: Init
    dtype: str = "f32"
    frozen: bool = False
    #: A buffer (e.g. batch norm's running statistics): stored with the weights and loaded with them,
    #: but state rather than a trainable parameter (always frozen too); summaries count it apart.
    buffer: bool = False
    tied_to: str | None = None  # the full name of the parameter this one shares storage with
    #: For parameters made by a pass: how to compute the value from the unoptimised graph's
    #: parameters, as a weight expression (see compiler/weightexpr.py). None: kept as it was.
    derive: tuple | None = None

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def slice_step(item: tuple) -> int:
    """The step of a slice item of a getitem's `index`. The items are ('int', i), ('slice', start, stop)
    for a step of 1 (as before steps existed, so those graphs and their keys are unchanged), and
    ('slice', start, stop, step) for a positive step other than 1."""
    return item[3] if len(item) == 4 else 1


@dataclass(frozen=True)
class Ref:
    """One output of a node."""

    node: int
    index: int = 0

    def __str__(self) -> str:
        return f"%{self.node}" + (f".{self.index}" if self.index else "")


@dataclass(frozen=True)
class Frame:
    """One block instance a node was elaborated in: `block` called as attribute `name` (and `index`)."""

    block: str
    name: str
    index: int | None = None

    @property
    def segments(self) -> tuple[str, ...]:
        return (self.name,) if self.index is None else (self.name, str(self.index))


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[Ref, ...]
    attrs: tuple[tuple[str, Any], ...]
    outputs: tuple[TensorType, ...]
    span: Span
    name: str = ""  # a readable hint taken from the spec, e.g. "h" or "attention"
    scope: tuple[Frame, ...] = ()
    params: tuple[ParamSpec, ...] = ()
    path: tuple[str, ...] = ()  # module path of the parameters' owner, e.g. ("h", "0", "attention")

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def attr_dict(self) -> dict[str, Any]:
        return dict(self.attrs)

    @property
    def type(self) -> TensorType:
        return self.outputs[0]

    def replace(self, **changes: Any) -> "Node":
        if all(getattr(self, k) == v for k, v in changes.items()):
            return self
        return dataclasses.replace(self, **changes)

    def param_names(self) -> list[str]:
        return [".".join(self.path + (p.name,)) for p in self.params]


@dataclass
class Graph:
    """A typed dataflow graph with named inputs and outputs."""

    name: str
    g: nx.DiGraph = field(default_factory=nx.DiGraph)
    inputs: tuple[tuple[str, int], ...] = ()  # (name, node id of its `input` node)
    outputs: tuple[tuple[str, Ref], ...] = ()
    #: symbol -> (example value, min, max or None)
    dims: dict[str, tuple[int, int, int | None]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # the bound spec parameters
    seed: int = 0
    #: outputs only training needs; a deploy build drops them and what only they need
    training_outputs: frozenset[str] = frozenset()
    #: block instance (its frames) -> ((block argument name, Ref), ...): names for generated code
    block_args: dict[tuple[Frame, ...], tuple[tuple[str, Ref], ...]] = field(default_factory=dict)
    #: which block argument a value read in a block instance was, where the elaborator saw it (two
    #: arguments may be passed one value): (node id, input slot) -> the argument of the node's instance
    #: that the input reads, and (child instance, its argument) -> the argument of the calling instance
    #: passed to it. Names for generated code; passes need not keep it (a missing entry is fine)
    arg_reads: dict[tuple[int, int], str] = field(default_factory=dict)
    arg_passes: dict[tuple[tuple[Frame, ...], str], str] = field(default_factory=dict)
    _next: int = 0

    # -- building --------------------------------------------------------------------------
    def add(self, node: Node) -> int:
        nid = self._next
        self._next += 1
        self.g.add_node(nid, **{NODE: node})
        for slot, ref in enumerate(node.inputs):
            if self.g.has_edge(ref.node, nid):
                self.g.edges[ref.node, nid][SLOTS].append(slot)
            else:
                self.g.add_edge(ref.node, nid, **{SLOTS: [slot]})
        return nid

    def copy(self) -> "Graph":
        out = dataclasses.replace(self, g=self.g.copy(), dims=dict(self.dims), params=dict(self.params),
                                  block_args=dict(self.block_args), arg_reads=dict(self.arg_reads),
                                  arg_passes=dict(self.arg_passes))
        for u, v, data in out.g.edges(data=True):
            data[SLOTS] = list(data[SLOTS])
        return out

    # -- reading ---------------------------------------------------------------------------
    def node(self, nid: int) -> Node:
        return self.g.nodes[nid][NODE]

    def type_of(self, ref: Ref) -> TensorType:
        return self.node(ref.node).outputs[ref.index]

    def order(self) -> list[int]:
        """Node ids in a deterministic topological order (creation order among ready nodes)."""
        return list(nx.lexicographical_topological_sort(self.g))

    def nodes(self) -> Iterator[tuple[int, Node]]:
        for nid in self.order():
            yield nid, self.node(nid)

    def users(self, nid: int) -> list[int]:
        return sorted(self.g.successors(nid))

    def param_count(self) -> int:
        """Distinct parameters (a tied parameter counts once, at its owner)."""
        return sum(p.numel() for _, n in self.nodes() for p in n.params if p.tied_to is None)

    def shared_params(self) -> frozenset[str]:
        """Full names of the parameters other parameters are tied to (`tie=`, `share=`): rewriting
        one of them (fusing, folding) changes every layer that shares it."""
        return frozenset(p.tied_to for _, n in self.nodes() for p in n.params if p.tied_to is not None)

    def example_bindings(self) -> dict[str, int]:
        return {s: ex for s, (ex, _, _) in self.dims.items()}

    def nonpositive_dims(self, bindings: Mapping[str, int]) -> list[tuple[int, int, Dim, int]]:
        """(node id, axis, dimension, its value) where a symbolic dimension of a node's output is below 1
        under `bindings` (a conv's T - 4 at T = 3), once per dimension, at the first node (in order) that
        has it."""
        seen: set = set()
        out = []
        for nid, node in self.nodes():
            for t in node.outputs:
                for axis, d in enumerate(t.shape):
                    if isinstance(d, int) or d in seen or not d.symbols <= set(bindings):
                        continue
                    value = evaluate(d, bindings)
                    if value < 1:
                        seen.add(d)
                        out.append((nid, axis, d, value))
        return out

    def __len__(self) -> int:
        return self.g.number_of_nodes()


__all__ = ["Graph", "Node", "Ref", "Frame", "ParamSpec", "Init", "TensorType", "DTYPES", "FLOAT_DTYPES",
           "INT_DTYPES", "DTYPE_BYTES", "Sym", "Dim", "NODE", "SLOTS"]
