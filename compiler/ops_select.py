"""Selection and indexing operators: largest values and their positions, gathering along a
dimension, and new axes of size 1.

They build hard (argmax-style) attention in the spec language: the n-gram head and the categorical
attention of Transformer Programs (SEEDS.md rows 6 and 12) pick key positions with `amax` over
`where(match, arange(T), 0)` and read values with `gather`; `x[:, None]` (an `unsqueeze` node)
lines up queries against keys for pairwise comparisons. All are deterministic, so passes may merge
two equal calls (cse); none of them is folded.
"""

from __future__ import annotations

from .dims import fmt
from .ir import INT_DTYPES, TensorType
from .ops import _max_of, norm_axis, numel, shape_str
from .registry import Arg, OpCall, OpError, op

T = TensorType


def _axes(c: OpCall, x: TensorType, name: str) -> set[int]:
    dims = c.a("dim")
    if dims is None:
        return set(range(x.rank))
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if not dims:
        raise OpError(f"{name}: dim=[] names no dimension; leave dim out to reduce over all of them", "dim")
    axes = {norm_axis(d, x.rank, name) for d in dims}
    if len(axes) != len(dims):
        raise OpError(f"{name}: repeated dimension in {list(dims)}", "dim")
    return axes


def _extreme(name: str, what: str):
    def infer(c: OpCall):
        x = c.t("x")
        if x.dtype == "bool":
            raise OpError(f"{name}: x {shape_str(x)} is bool; cast it to an integer or float dtype first", "x")
        if x.rank == 0:
            raise OpError(f"{name}: x is a scalar; there is nothing to reduce", "x")
        axes = _axes(c, x, name)
        keep = c.a("keepdim")
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keep or i not in axes)
        return T(x.dtype, shape, x.value_range)  # the result is one of x's values

    infer.__doc__ = (f"{name}(x, dim=none, keepdim=false): the {what} of x over one dimension, a list of them, "
                     f"or all; keeps x's dtype (and, for integers, their value range).")
    op(name, Arg("x", "tensor"), Arg("dim", "axes", None), Arg("keepdim", "bool", False),
       flops=lambda c, o: numel(c.t("x")), category="reduction")(infer)


_extreme("amax", "largest value")
_extreme("amin", "smallest value")


@op("argmax", Arg("x", "tensor"), Arg("dim", "axis", -1), Arg("keepdim", "bool", False),
    flops=lambda c, o: numel(c.t("x")), category="reduction")
def _argmax(c: OpCall):
    """argmax(x, dim=-1, keepdim=false): the index of the largest value along one dimension (the first
    one on ties), as i64 in range(size of that dimension): a categorical value, e.g. for one_hot."""
    x = c.t("x")
    if x.dtype == "bool":
        raise OpError(f"argmax: x {shape_str(x)} is bool; cast it to an integer or float dtype first", "x")
    if x.rank == 0:
        raise OpError("argmax: x is a scalar; there is no dimension to search", "x")
    axis = norm_axis(c.a("dim"), x.rank, "argmax")
    n = x.shape[axis]
    hi = n if isinstance(n, int) else _max_of(n, c)
    shape = tuple(1 if i == axis else d for i, d in enumerate(x.shape) if c.a("keepdim") or i != axis)
    return T("i64", shape, (0, hi) if hi is not None else None)


@op("gather", Arg("x", "tensor"), Arg("index", "tensor"), Arg("dim", "axis", -1), flops=lambda c, o: 0,
    category="shape")
def _gather(c: OpCall):
    """gather(x, index, dim=-1): out[..., i, ...] = x[..., index[..., i, ...], ...] along `dim`. index is an
    integer tensor of x's rank and of x's sizes in every other dimension; the result has index's shape and
    x's dtype (e.g. the value a hard-attention head reads at the key position it picked)."""
    x, index = c.t("x"), c.t("index")
    if index.dtype not in INT_DTYPES:
        raise OpError(f"gather: index must be an integer tensor, got {shape_str(index)}", "index")
    if index.rank != x.rank:
        raise OpError(f"gather: index {shape_str(index)} must have the rank of x {shape_str(x)} "
                      f"({index.rank} vs {x.rank})", "index")
    axis = norm_axis(c.a("dim"), x.rank, "gather")
    for i, (a, b) in enumerate(zip(x.shape, index.shape)):
        if i != axis and a != b:
            raise OpError(f"gather: index {shape_str(index)} does not fit x {shape_str(x)}: dimension {i} is "
                          f"{fmt(b)} vs {fmt(a)} (only dimension {axis}, the one gathered along, may differ)",
                          "index")
    n = x.shape[axis]
    if index.value_range is not None and isinstance(n, int):
        lo, hi = index.value_range
        if lo < 0 or hi > n:
            shown = f"range({lo}, {hi})" if lo else f"range({hi})"
            raise OpError(f"gather: index takes values in {shown}, outside dimension {axis} of x "
                          f"{shape_str(x)} (size {n})", "index")
    return T(x.dtype, index.shape, x.value_range)


@op("unsqueeze", Arg("x", "tensor"), Arg("dim", "axis"), flops=lambda c, o: 0, category="shape")
def _unsqueeze(c: OpCall):
    """unsqueeze(x, dim) or x[:, None]: a new dimension of size 1 at position `dim` (-1 appends one)."""
    x = c.t("x")
    d = c.a("dim")
    if not -(x.rank + 1) <= d <= x.rank:
        raise OpError(f"unsqueeze: position {d} is out of range for a new dimension of {shape_str(x)} "
                      f"(from {-(x.rank + 1)} to {x.rank})", "dim")
    d = d % (x.rank + 1)
    return T(x.dtype, x.shape[:d] + (1,) + x.shape[d:], x.value_range)

