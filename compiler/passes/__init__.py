"""The pass manager: named, pure graph -> graph passes with an opt level, run as one flat pipeline.

    graph, records = optimize(graph, PassContext(opt_level=2, disabled={"cse"}, print_after={"all"}))

Each pass returns a `PassResult(graph, modified, notes)` and never mutates its input. With
`verify_each` (tests, `--debug`), the IR verifier runs after every pass; a failure names the pass
and the passes that ran before it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from ..ir import Graph
from ..printer import print_graph
from ..rewrite import rehome_ties
from ..verify import IRError, verify


@dataclass(frozen=True)
class PassContext:
    opt_level: int = 1
    disabled: frozenset[str] = frozenset()
    print_after: frozenset[str] = frozenset()  # pass names, or {"all"}
    verify_each: bool = False
    #: An inference build: dropout is the identity.
    inference: bool = True
    #: A deploy build: training-only outputs, and all that only they need, are dropped.
    deploy: bool = False
    emit: Callable[[str], None] = print

    def wants(self, info: "PassInfo") -> bool:
        return info.opt_level <= self.opt_level and info.name not in self.disabled


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    modified: bool
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassInfo:
    name: str
    opt_level: int
    doc: str
    fn: Callable[[Graph, PassContext], PassResult]
    exact: bool = True  # keeps outputs equal up to float rounding


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, opt_level: int, exact: bool = True):
    def deco(fn: Callable[[Graph, PassContext], PassResult]):
        if name in PASSES:
            raise ValueError(f"pass {name} registered twice")
        PASSES[name] = PassInfo(name, opt_level, (fn.__doc__ or "").strip().splitlines()[0], fn, exact)
        return fn

    return deco


def pipeline() -> list[str]:
    """The optimisation pipeline, in order (STYLE.md point 7): one line per step."""
    return [
        "drop_training_outputs",  # deploy builds: training-only outputs and what only they need
        "fold_constants",       # arithmetic on constants done once; x * 1, x + 0 and the like removed
        "eliminate_identity",   # dropout at inference, cancelling transposes, no-op reshapes and casts
        "cse",                  # identical computations done once
        "fold_batch_norm",      # inference BatchNorm into the conv or linear before it
        "merge_parallel_convs", # RepConv / RepVGG: parallel convs of one input (+ x or inference bn(x)) into one conv
        "fold_lookups",         # an embedding and the per-token layers after it: one precomputed table
        "merge_adapters",       # LoRA and other linear adapters: into the base weight
        "merge_linear_chains",  # linear -> linear with nothing between them: one linear (when cheaper)
        "fuse_qkv",             # the q/k/v projections of one input: one matmul
        "attention_sdpa",       # softmax attention onto scaled_dot_product_attention
        "dce",                  # nodes that no output needs
    ]


@dataclass(frozen=True)
class PassRecord:
    name: str
    modified: bool
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    notes: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.name, "nodes": [self.nodes_before, self.nodes_after],
                "params": [self.params_before, self.params_after], **({"notes": self.notes} if self.notes else {})}


class PassError(Exception):
    """A pass produced an invalid graph (a compiler bug)."""


def optimize(graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, list[PassRecord]]:
    """Run the pipeline's passes enabled by `ctx`. Returns the new graph and a record per pass run."""
    ctx = ctx or PassContext()
    unknown = sorted(set(ctx.disabled) - set(PASSES)) + sorted(set(ctx.print_after) - set(PASSES) - {"all"})
    if unknown:
        raise KeyError(f"unknown pass {unknown[0]!r}; passes: {', '.join(pipeline())}")
    records: list[PassRecord] = []
    ran: list[str] = []
    for name in pipeline():
        info = PASSES[name]
        if not ctx.wants(info):
            continue
        before_nodes, before_params = len(graph), graph.param_count()
        result = info.fn(graph, ctx)
        if result.modified and result.graph is not graph:
            result = dataclasses.replace(result, graph=rehome_ties(graph, result.graph))
        ran.append(name)
        if ctx.verify_each:
            try:
                verify(result.graph)
            except IRError as e:
                raise PassError(f"the IR is invalid after pass '{name}' (passes run: {', '.join(ran)}): {e}") from None
        graph = result.graph
        records.append(PassRecord(name, result.modified, before_nodes, len(graph), before_params,
                                  graph.param_count(), result.notes))
        if "all" in ctx.print_after or name in ctx.print_after:
            ctx.emit(f"// IR after {name}{'' if result.modified else ' (unchanged)'}\n{print_graph(graph)}")
    return graph, records


def describe() -> list[tuple[str, int, str]]:
    """(name, opt level, one-line description) for every pass, in pipeline order."""
    return [(n, PASSES[n].opt_level, PASSES[n].doc) for n in pipeline()]


from . import cleanup, conv, fusion, lookup, pruning  # noqa: E402,F401  (the passes register themselves on import)
