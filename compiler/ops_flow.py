"""Optical-flow operators: backward warping, forward splatting and a local correlation volume.

SplatFlow (SEEDS.md row 25) refines a flow field RAFT-style, from a correlation volume, and moves frame-1
features forward along the flow by splatting. The three operators work on images x [B, C, H, W] and
flows [B, 2, H, W] in pixels: channel 0 the horizontal displacement (along W), channel 1 the vertical
one (along H).

Both warp and splat use the same bilinear taps: a pixel (i, j) with flow (u, v) at that pixel points at
(i + v, j + u); its four taps are the integer pixels around that point, weighted (1 - fy)(1 - fx),
(1 - fy) fx, fy (1 - fx), fy fx with fx, fy the fractional parts; taps outside the image weigh 0.
`warp` reads through the taps (a gather), `splat` writes through them (a scatter-add), so splat is
the adjoint of warp: <splat(x, flow), y> = <x, warp(y, flow)> for every x, y and flow. All three are
deterministic and free of side effects: passes may merge two equal calls.
"""

from __future__ import annotations

from .dims import fmt
from .ir import TensorType
from .ops import need_float, need_layout, numel, shape_str
from .registry import Arg, OpCall, OpError, op

T = TensorType

#: The widest correlation window: (2 r + 1)^2 output channels, at most 4096 (r <= 31).
MAX_RADIUS = 31

#: FLOPs per pixel for the four bilinear taps' positions and weights (floor, fractions, 4 products, bounds).
TAP_FLOPS = 16


def _image_and_flow(c: OpCall, name: str, x_name: str = "x") -> TensorType:
    """Check x [B, C, H, W] and flow [B, 2, H, W] of x's dtype; returns x's type."""
    x, flow = c.t(x_name), c.t("flow")
    need_layout(x, 2, name)
    if flow.dtype != x.dtype:
        raise OpError(f"{name}: flow {shape_str(flow)} must have the dtype of {x_name} {shape_str(x)}", "flow")
    if flow.rank != 4 or flow.shape[1] != 2:
        raise OpError(f"{name}: flow must be [B, 2, H, W] (horizontal and vertical displacements in pixels), "
                      f"got {shape_str(flow)}", "flow")
    for axis, what in ((0, "B"), (2, "H"), (3, "W")):
        if flow.shape[axis] != x.shape[axis]:
            raise OpError(f"{name}: flow {shape_str(flow)} does not fit {x_name} {shape_str(x)}: dimension {axis} "
                          f"({what}) is {fmt(flow.shape[axis])} vs {fmt(x.shape[axis])}", "flow")
    return x


def _pixels(x: TensorType):
    return x.shape[0] * x.shape[2] * x.shape[3]


@op("warp", Arg("x", "tensor"), Arg("flow", "tensor"),
    flops=lambda c, o: 8 * numel(o[0]) + TAP_FLOPS * _pixels(c.t("x")))
def _warp(c: OpCall):
    """warp(x, flow): bilinear backward warping of x [B, C, H, W] by flow [B, 2, H, W] (pixels; channel 0
    along W, channel 1 along H): y[b, :, i, j] = x[b, :] sampled bilinearly at (i + flow[b, 1, i, j],
    j + flow[b, 0, i, j]), taps outside the image counting as 0. This is torch's grid_sample with
    align_corners=True and padding_mode='zeros' on the grid (j + u, i + v) normalised to [-1, 1].
    FLOPs: 8 per output element (4 taps, multiply-add) and 16 per pixel for the taps."""
    return _image_and_flow(c, "warp")


def _splat_flops(c: OpCall, outs):
    base = 8 * numel(outs[0]) + TAP_FLOPS * _pixels(c.t("x"))
    if c.a("mode") == "average":  # the weights' sums (4 adds per pixel), then x / (sum + eps)
        base += 4 * _pixels(c.t("x")) + 2 * numel(outs[0])
    return base


@op("splat", Arg("x", "tensor"), Arg("flow", "tensor"), Arg("mode", "str", "sum", ("sum", "average")),
    Arg("eps", "float", 1e-7), flops=_splat_flops)
def _splat(c: OpCall):
    """splat(x, flow, mode='sum', eps=1e-7): forward splatting of x [B, C, H, W] along flow [B, 2, H, W]
    (pixels; channel 0 along W, channel 1 along H): each source pixel (i, j) sends its value to the four
    integer pixels around (i + flow[b, 1, i, j], j + flow[b, 0, i, j]) with the bilinear weights, and each
    target sums what it receives; what lands outside the image is dropped. mode='sum' is summation
    splatting, the adjoint of warp(., flow); mode='average' divides it by the splatted weights,
    splat(x) / (splat(ones) + eps): a pixel that receives a single source gets (about) its value, one
    that receives nothing gets 0. FLOPs: as warp; 'average' adds 4 per pixel and 2 per output element."""
    x = _image_and_flow(c, "splat")
    if not c.a("eps") > 0:
        raise OpError(f"splat: eps must be positive, got {c.a('eps')}", "eps")
    return x


@op("correlation", Arg("f1", "tensor"), Arg("f2", "tensor"), Arg("radius", "int", 4),
    flops=lambda c, o: 2 * c.t("f1").shape[1] * numel(o[0]))
def _correlation(c: OpCall):
    """correlation(f1, f2, radius=4): the local correlation volume of two feature maps [B, C, H, W]:
    y[b, k, i, j] = sum over c of f1[b, c, i, j] * f2[b, c, i + dy, j + dx] for every offset (dy, dx) in
    [-r, r]^2, k = (dy + r) (2r + 1) + (dx + r) (row-major over the window), f2 taken as 0 outside the image;
    y is [B, (2r + 1)^2, H, W]. Plain dot products: RAFT divides them by sqrt(C), which a spec writes
    itself. FLOPs: 2 C per output element."""
    f1, f2 = c.t("f1"), c.t("f2")
    need_float(f1, "correlation", "f1")
    if f1.rank != 4:
        raise OpError(f"correlation: expected f1 of layout [B, C, H, W] (rank 4), got {shape_str(f1)}", "f1")
    if f2.dtype != f1.dtype or f2.shape != f1.shape:
        raise OpError(f"correlation: f2 {shape_str(f2)} must have the type of f1 {shape_str(f1)}", "f2")
    r = c.a("radius")
    if not 0 <= r <= MAX_RADIUS:
        raise OpError(f"correlation: radius must be in [0, {MAX_RADIUS}] (a (2r + 1)^2 window), got {r}", "radius")
    return T(f1.dtype, (f1.shape[0], (2 * r + 1) ** 2, f1.shape[2], f1.shape[3]))
