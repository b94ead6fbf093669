"""Image geometry operators: rotations by quarter turns.

rot90 gives self-supervised label augmentation (SEEDS.md row 14) its four rotated copies of each
image, inside the graph, so that the joint (class, rotation) head and the aggregated inference over
rotations are written in the spec. A rotation moves values and computes nothing (0 FLOPs).
"""

from __future__ import annotations

from .ops import _show, norm_axis, shape_str
from .registry import Arg, OpCall, OpError, op
from .ir import TensorType

T = TensorType


@op("rot90", Arg("x", "tensor"), Arg("k", "int", 1), Arg("dims", "any", (2, 3)), flops=lambda c, o: 0,
    category="shape")
def _rot90(c: OpCall):
    """rot90(x, k=1, dims=[2, 3]): x turned by k quarter turns in the plane of two dimensions, from the first
    towards the second (torch.rot90; for [B, C, H, W] images, counter-clockwise as displayed). k may be
    negative; an odd k swaps the sizes of the two dimensions."""
    x = c.t("x")
    dims = c.a("dims")
    if not (isinstance(dims, (list, tuple)) and len(dims) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) for d in dims)):
        raise OpError(f"rot90: dims must be a list of two dimension indices, got {_show(dims)}", "dims")
    if x.rank < 2:
        raise OpError(f"rot90: x {shape_str(x)} needs at least two dimensions to turn in", "x")
    a, b = (norm_axis(d, x.rank, "rot90", "dims") for d in dims)
    if a == b:
        raise OpError(f"rot90: dims {_show(dims)} name the same dimension twice", "dims")
    shape = list(x.shape)
    if c.a("k") % 2:
        shape[a], shape[b] = shape[b], shape[a]
    return T(x.dtype, tuple(shape), x.value_range)
