"""TVM (Relax) lowerings of the optical-flow operators (compiler/ops_flow.py), composed from Relax ops as
backends/pytorch/lowering_flow.py's helpers compute them: the four bilinear taps of every pixel (flat index
into H * W and weight, 0 outside the image), then warp gathers through them (gather_elements) and splat
adds through them (scatter_elements with reduction 'add'); correlation pads f2, takes each shifted window
(take along H and W) and sums f1 times it over the channels.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax import op as R

from .lowering import Ctx, LoweringError


def _taps(c: Ctx, flow: relax.Expr) -> list[tuple[relax.Expr, relax.Expr]]:
    """[(index [B, 1, H * W] int64, weight [B, 1, H * W])] for the four taps of every pixel."""
    b, _, h, w = c.shape(c.in_type(1).shape)
    dtype = c.dtype
    u = c.emit(R.strided_slice(flow, axes=[1], begin=[0], end=[1]))  # [B, 1, H, W]
    v = c.emit(R.strided_slice(flow, axes=[1], begin=[1], end=[2]))
    cols = c.emit(R.reshape(R.arange(0, w, 1, dtype=dtype), [1, 1, 1, w]))
    rows = c.emit(R.reshape(R.arange(0, h, 1, dtype=dtype), [1, 1, h, 1]))
    w_last, h_last = c.emit(R.max(cols)), c.emit(R.max(rows))  # W - 1 and H - 1, as values of the dtype
    px, py = c.emit(R.add(u, cols)), c.emit(R.add(v, rows))
    x0, y0 = c.emit(R.floor(px)), c.emit(R.floor(py))
    fx, fy = c.emit(R.subtract(px, x0)), c.emit(R.subtract(py, y0))
    one, zero = c.const(1.0), c.const(0.0)
    width = c.emit(R.add(w_last, one))
    taps = []
    for dy, wy in ((0, R.subtract(one, fy)), (1, fy)):
        for dx, wx in ((0, R.subtract(one, fx)), (1, fx)):
            xi = c.emit(R.add(x0, c.const(float(dx)))) if dx else x0
            yi = c.emit(R.add(y0, c.const(float(dy)))) if dy else y0
            inside = c.emit(R.logical_and(
                R.logical_and(R.greater_equal(xi, zero), R.less_equal(xi, w_last)),
                R.logical_and(R.greater_equal(yi, zero), R.less_equal(yi, h_last))))
            weight = c.emit(R.where(inside, R.multiply(wy, wx), zero))
            flat = c.emit(R.where(inside, R.add(R.multiply(yi, width), xi), zero))
            index = c.emit(R.astype(flat, "int64"))
            taps.append((c.emit(R.reshape(index, [b, 1, h * w])), c.emit(R.reshape(weight, [b, 1, h * w]))))
    return taps


def _flat(c: Ctx, x: relax.Expr) -> tuple[relax.Expr, list]:
    b, ch, h, w = c.shape(c.in_type(0).shape)
    return c.emit(R.reshape(x, [b, ch, h * w])), [b, ch, h * w]


def _warp(c: Ctx, xs: list) -> relax.Expr:
    flat, shape = _flat(c, xs[0])
    out = None
    for index, weight in _taps(c, xs[1]):
        taken = c.emit(R.gather_elements(flat, c.emit(R.broadcast_to(index, shape)), axis=2))
        term = c.emit(R.multiply(taken, weight))
        out = term if out is None else c.emit(R.add(out, term))
    return R.reshape(out, c.shape(c.out.shape))


def _splat(c: Ctx, xs: list) -> relax.Expr:
    flat, shape = _flat(c, xs[0])
    out = c.emit(R.zeros(shape, c.dtype))
    norm = c.emit(R.zeros([shape[0], 1, shape[2]], c.dtype)) if c.a("mode") == "average" else None
    for index, weight in _taps(c, xs[1]):
        out = c.emit(R.scatter_elements(out, c.emit(R.broadcast_to(index, shape)), c.emit(R.multiply(flat, weight)),
                                        axis=2, reduction="add"))
        if norm is not None:
            norm = c.emit(R.scatter_elements(norm, index, weight, axis=2, reduction="add"))
    if norm is not None:
        out = c.emit(R.divide(out, c.emit(R.add(norm, c.const(float(c.a("eps")))))))
    return R.reshape(out, c.shape(c.out.shape))


def _correlation(c: Ctx, xs: list) -> relax.Expr:
    r = int(c.a("radius"))
    if r < 0:  # pragma: no cover - the shape rule refuses it
        raise LoweringError(f"correlation: radius {r}")
    f1, f2 = xs
    _, _, h, w = c.shape(c.in_type(0).shape)
    padded = c.emit(R.nn.pad(f2, [0, 0, 0, 0, r, r, r, r])) if r else f2
    rows = c.emit(R.arange(0, h, 1, dtype="int64"))  # the window at offset (dy, dx) of the padded f2:
    cols = c.emit(R.arange(0, w, 1, dtype="int64"))  # rows dy + arange(H), columns dx + arange(W)
    parts = []
    for dy in range(2 * r + 1):
        # (mode="clip": the indices are in range by construction; TVM warns of "fast" mode otherwise)
        band = (c.emit(R.take(padded, c.emit(R.add(rows, relax.const(dy, "int64"))), axis=2, mode="clip"))
                if r else padded)
        for dx in range(2 * r + 1):
            window = (c.emit(R.take(band, c.emit(R.add(cols, relax.const(dx, "int64"))), axis=3, mode="clip"))
                      if r else band)
            parts.append(c.emit(R.sum(R.multiply(f1, window), axis=[1], keepdims=True)))
    return R.concat(parts, axis=1) if len(parts) > 1 else parts[0]


LOWERINGS = {"warp": _warp, "splat": _splat, "correlation": _correlation}
