"""detach(x): a stop-gradient. The value of x unchanged forward; backward, no gradient flows into x.

Layer-local learning rules cut the graph at every layer boundary: counter-current learning (Kao &
Hariharan, NeurIPS 2024; SEEDS.md row 15) feeds each forward and each feedback layer a detached input,
so that a layer's local loss trains that layer alone. `grad_reverse(x, 0)` is not a substitute: it
scales the gradient by -0 (which still builds the backward graph through x and gives -0 entries).

Passes must keep it: no rule names it (it is not an identity to eliminate, and merge_linear_chains,
fold_lookups and the other fusions only look through the ops they name); it is pure, so cse may
compute two detaches of one value once, which leaves every gradient the same.
"""

from __future__ import annotations

from .ir import TensorType
from .ops import need_float
from .registry import Arg, OpCall, op


@op("detach", Arg("x", "tensor"), flops=lambda c, o: 0, category="layer")
def _detach(c: OpCall):
    """detach(x): x unchanged forward; no gradient flows back into x (a stop-gradient, for layer-local
    losses: counter-current learning feeds every layer a detached input)."""
    x = c.t("x")
    need_float(x, "detach")
    return TensorType(x.dtype, x.shape)
