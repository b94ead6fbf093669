"""Static facts about a graph, computed without allocating a single weight: outputs with shapes,
parameter counts, FLOPs (symbolic, and evaluated at the example dimensions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .dims import Dim, evaluate, fmt
from .ir import DTYPE_BYTES, Graph, TensorType
from .registry import REGISTRY, OpCall


@dataclass(frozen=True)
class OutputInfo:
    name: str
    type: TensorType
    example_shape: tuple[int, ...]


@dataclass(frozen=True)
class Summary:
    name: str
    inputs: tuple[OutputInfo, ...]
    outputs: tuple[OutputInfo, ...]
    params: int
    trainable_params: int
    param_bytes: int
    flops: Dim  # symbolic
    example_flops: int
    bindings: dict[str, int]
    nodes: int
    flops_by_op: dict[str, int] = field(default_factory=dict)
    buffers: int = 0  # elements of buffers (running statistics), not counted in params
    training_only: tuple[str, ...] = ()  # outputs a deploy build drops
    deploy: "Summary | None" = None  # the same facts for the deploy graph, when it differs
    bound: dict[str, Any] = field(default_factory=dict)  # the spec's params as bound (derived ones too)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [{"name": o.name, "type": str(o.type), "example_shape": list(o.example_shape)}
                       for o in self.inputs],
            "outputs": [{"name": o.name, "type": str(o.type), "example_shape": list(o.example_shape)}
                        for o in self.outputs],
            "params": self.params,
            "trainable_params": self.trainable_params,
            "buffers": self.buffers,
            "param_bytes": self.param_bytes,
            "flops": fmt(self.flops),
            "example_flops": self.example_flops,
            "example_dims": dict(self.bindings),
            "nodes": self.nodes,
            "bound_params": dict(self.bound),
            **({"training_only": list(self.training_only)} if self.training_only else {}),
            **({"deploy": self.deploy.to_json()} if self.deploy is not None else {}),
        }


def node_flops(graph: Graph, nid: int) -> Dim:
    node = graph.node(nid)
    opdef = REGISTRY[node.op]
    if opdef.flops is None:
        return 0
    call = op_call(graph, nid)
    return opdef.flops(call, node.outputs)


def op_call(graph: Graph, nid: int) -> OpCall:
    """Rebuild the OpCall a node was made from (input types by argument name, attributes)."""
    node = graph.node(nid)
    opdef = REGISTRY[node.op]
    attrs = dict(node.attrs)
    tensors: dict[str, Any] = {}
    it = iter(node.inputs)
    for a in opdef.tensor_args:
        if a.kind == "tensors":
            tensors[a.name] = [graph.type_of(next(it)) for _ in range(attrs[f"{a.name}#"])]
        elif a.kind == "tensor?":
            tensors[a.name] = graph.type_of(next(it)) if attrs[f"{a.name}?"] else None
        else:
            tensors[a.name] = graph.type_of(next(it))
    plain = {k: v for k, v in attrs.items() if not (k.endswith("#") or k.endswith("?"))}
    bounds = {s: (lo, hi) for s, (_, lo, hi) in graph.dims.items()}
    return OpCall(node.op, tensors, plain, bounds)


def summarize(graph: Graph, bindings: dict[str, int] | None = None) -> Summary:
    b = dict(graph.example_bindings())
    b.update(bindings or {})
    total: Dim = 0
    by_op: dict[str, int] = {}
    params = trainable = nbytes = buffers = 0
    for nid, node in graph.nodes():
        f = node_flops(graph, nid)
        total = total + f
        by_op[node.op] = by_op.get(node.op, 0) + evaluate(f, b)
        for p in node.params:
            if p.tied_to is not None:
                continue
            nbytes += p.numel() * DTYPE_BYTES[p.dtype]
            if p.buffer:
                buffers += p.numel()
                continue
            params += p.numel()
            if not p.frozen:
                trainable += p.numel()
    ins = tuple(OutputInfo(name, graph.node(nid).type, graph.node(nid).type.concrete(b)) for name, nid in graph.inputs)
    outs = tuple(OutputInfo(name, graph.type_of(ref), graph.type_of(ref).concrete(b)) for name, ref in graph.outputs)
    return Summary(graph.name, ins, outs, params, trainable, nbytes, total, evaluate(total, b), b, len(graph),
                   {k: v for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]) if v}, buffers,
                   tuple(n for n, _ in graph.outputs if n in graph.training_outputs), bound=dict(graph.params))


def human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
