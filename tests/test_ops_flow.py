"""warp, splat and correlation (compiler/ops_flow.py): the built ops in float64 against hand-written
Python loops (bilinear sampling, bilinear scatter, dot products over a window), torch's grid_sample
(align_corners=True), the adjoint identity <splat(x, flow), y> = <x, warp(y, flow)>, located errors
and FLOPs.

Tolerances (float64): the loops and the ops do the same arithmetic in another order, so they agree to
1e-12 (max abs error, values of order 1 to 10); grid_sample finds the sampling point through the
normalised grid, ((g + 1) / 2) (W - 1), a few roundings away, and agrees to 1e-12 as well. The adjoint
identity holds to 1e-12 relative to the magnitude of the inner product (both sides sum the same
products x[p] w y[q] in different orders).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from opcheck import assert_error, flops_of, load64, spec_text

TOL = 1e-12
f64 = torch.float64
spec = functools.partial(spec_text, dims="B: 2, H: 5, W: 7")

OPS = spec("x: 'f32[B, C, H, W]', y: 'f32[B, C, H, W]', flow: 'f32[B, 2, H, W]'",
           "w = warp(x, flow)\ns = splat(x, flow)\na = splat(x, flow, mode='average', eps=1e-7)\n"
           "c = correlation(x, y, radius=2)", "w s a c").replace("dims: {", "dims: {C: 3, ")


def taps(h, w, py, px):
    """The bilinear taps of the point (py, px) in an h x w image: ((row, col), weight) inside the image."""
    y0, x0 = math.floor(py), math.floor(px)
    fy, fx = py - y0, px - x0
    out = []
    for yi, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xi, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yi < h and 0 <= xi < w:
                out.append(((yi, xi), wy * wx))
    return out


def warp_loop(x, flow):
    b_, c_, h, w = x.shape
    out = torch.zeros_like(x)
    for b in range(b_):
        for i in range(h):
            for j in range(w):
                for (yi, xi), wt in taps(h, w, i + flow[b, 1, i, j].item(), j + flow[b, 0, i, j].item()):
                    out[b, :, i, j] += wt * x[b, :, yi, xi]
    return out


def splat_loop(x, flow):
    """(summed values, summed weights): every source pixel scattered to its taps."""
    b_, c_, h, w = x.shape
    out, weights = torch.zeros_like(x), torch.zeros(b_, 1, h, w, dtype=x.dtype)
    for b in range(b_):
        for i in range(h):
            for j in range(w):
                for (yi, xi), wt in taps(h, w, i + flow[b, 1, i, j].item(), j + flow[b, 0, i, j].item()):
                    out[b, :, yi, xi] += wt * x[b, :, i, j]
                    weights[b, 0, yi, xi] += wt
    return out, weights


def correlation_loop(f1, f2, r):
    b_, c_, h, w = f1.shape
    out = torch.zeros(b_, (2 * r + 1) ** 2, h, w, dtype=f1.dtype)
    for b in range(b_):
        for k, (dy, dx) in enumerate((dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)):
            for i in range(h):
                for j in range(w):
                    if 0 <= i + dy < h and 0 <= j + dx < w:
                        out[b, k, i, j] = sum(f1[b, c, i, j].item() * f2[b, c, i + dy, j + dx].item()
                                              for c in range(c_))
    return out


def flows(seed, b=2, h=5, w=7):
    """Flows of several kinds: small, large (most taps outside), whole pixels (taps on pixel borders),
    zero, and all outside the image."""
    gen = torch.Generator().manual_seed(seed)
    return {"small": torch.randn(b, 2, h, w, generator=gen, dtype=f64),
            "large": 6 * torch.randn(b, 2, h, w, generator=gen, dtype=f64),
            "whole": torch.randint(-2, 3, (b, 2, h, w), generator=gen).to(f64),
            "zero": torch.zeros(b, 2, h, w, dtype=f64),
            "outside": torch.full((b, 2, h, w), 50.0, dtype=f64)}


def run_ops(x, y, flow):
    with torch.no_grad():
        return load64(OPS)(x, y, flow)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


@pytest.mark.parametrize("kind", ["small", "large", "whole", "zero", "outside"])
def test_warp_and_splat_equal_hand_written_loops(kind):
    x, y = randn(2, 3, 5, 7, seed=1), randn(2, 3, 5, 7, seed=2)
    flow = flows(3)[kind]
    w, s, a, _ = run_ops(x, y, flow)
    assert (w - warp_loop(x, flow)).abs().max() <= TOL
    summed, weights = splat_loop(x, flow)
    assert (s - summed).abs().max() <= TOL
    assert (a - summed / (weights + 1e-7)).abs().max() <= TOL
    if kind == "outside":
        assert not w.any() and not s.any() and not a.any()
    if kind == "zero":
        assert torch.equal(w, x) and torch.equal(s, x)


def test_splat_of_ones_is_the_sum_of_the_bilinear_weights():
    flow = flows(4)["small"]
    ones = torch.ones(2, 3, 5, 7, dtype=f64)
    _, s, a, _ = run_ops(ones, ones, flow)
    _, weights = splat_loop(ones, flow)
    assert (s - weights.expand_as(s)).abs().max() <= TOL
    assert weights.max() > 1.2 and weights.min() < 0.5  # crowded and uncovered targets alike
    # the average of a constant image is the constant (up to eps) wherever something lands
    covered = weights.expand_as(a) > 1e-3
    assert (a[covered] - 1).abs().max() <= 1e-4 and not a[~covered].abs().max() > 1.0
    # every source pixel whose taps all land inside hands out weight 1: the total is the number of them
    assert s[:, 0].sum().item() == pytest.approx(weights.sum().item(), abs=1e-12)


@pytest.mark.parametrize("kind", ["small", "large", "whole"])
def test_warp_is_grid_sample_with_aligned_corners(kind):
    x = randn(2, 3, 5, 7, seed=5)
    flow = flows(6)[kind]
    w, *_ = run_ops(x, x, flow)
    h, wd = 5, 7
    gx = 2 * (torch.arange(wd, dtype=f64).view(1, 1, wd) + flow[:, 0]) / (wd - 1) - 1
    gy = 2 * (torch.arange(h, dtype=f64).view(1, h, 1) + flow[:, 1]) / (h - 1) - 1
    ref = F.grid_sample(x, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    assert (w - ref).abs().max() <= TOL


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["small", "large", "whole", "zero", "outside"])
def test_splat_is_the_adjoint_of_warp(seed, kind):
    x, y = randn(2, 3, 5, 7, seed=10 + seed), randn(2, 3, 5, 7, seed=20 + seed)
    flow = flows(30 + seed)[kind]
    model = load64(OPS)
    with torch.no_grad():
        s = model(x, y, flow)[1]
        wy = model(y, x, flow)[0]
    lhs, rhs = (s * y).sum().item(), (x * wy).sum().item()
    if kind == "outside":
        assert lhs == rhs == 0.0
    else:
        assert abs(lhs) > 1e-3
        assert abs(lhs - rhs) <= TOL * abs(lhs)


def test_splat_is_warps_vector_jacobian_product():
    """The gradient of <warp(y, flow), x> with respect to y is splat(x, flow) (autograd's adjoint)."""
    x, flow = randn(2, 3, 5, 7, seed=40), flows(41)["large"]
    y = randn(2, 3, 5, 7, seed=42).requires_grad_(True)
    model = load64(OPS)
    w = model(y, y, flow)[0]
    (grad,) = torch.autograd.grad((w * x).sum(), y)
    with torch.no_grad():
        s = model(x, x, flow)[1]
    assert (grad - s).abs().max() <= TOL


def test_gradients_reach_the_flow():
    """Both ops are differentiable in the flow (away from whole pixels): gradcheck in float64."""
    model = load64(OPS)
    x, y = randn(1, 2, 4, 5, seed=50), randn(1, 2, 4, 5, seed=51)
    flow = (0.3 + 0.4 * torch.rand(1, 2, 4, 5, generator=torch.Generator().manual_seed(52), dtype=f64)
            + torch.randint(-2, 2, (1, 2, 4, 5), generator=torch.Generator().manual_seed(53)))
    flow.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: model(x, y, f)[:3], (flow,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_correlation_equals_a_hand_written_loop(radius):
    f1, f2 = randn(2, 3, 5, 7, seed=60), randn(2, 3, 5, 7, seed=61)
    text = OPS.replace("radius=2", f"radius={radius}")
    with torch.no_grad():
        c = load64(text)(f1, f2, torch.zeros(2, 2, 5, 7, dtype=f64))[3]
    assert c.shape == (2, (2 * radius + 1) ** 2, 5, 7)
    assert (c - correlation_loop(f1, f2, radius)).abs().max() <= TOL
    # the centre channel is the plain per-pixel dot product
    centre = (2 * radius + 1) ** 2 // 2
    assert (c[:, centre] - (f1 * f2).sum(1)).abs().max() <= TOL


def test_shapes_with_symbolic_sizes():
    from opcheck import output_types
    assert output_types(OPS) == ["f32[B, C, H, W]"] * 3 + ["f32[B, 25, H, W]"]


def test_flops():
    assert flops_of(OPS, "warp", B=2, C=3, H=5, W=7) == 8 * 2 * 3 * 35 + 16 * 2 * 35
    assert flops_of(OPS, "splat", B=2, C=3, H=5, W=7) == (2 * (8 * 2 * 3 * 35 + 16 * 2 * 35)
                                                           + 4 * 2 * 35 + 2 * 2 * 3 * 35)
    assert flops_of(OPS, "correlation", B=2, C=3, H=5, W=7) == 2 * 3 * 25 * 2 * 35


IO = "x: 'f32[B, 3, H, W]', f: 'f32[B, 2, H, W]', g: 'f32[B, 3, H, W]', d: 'f64[B, 2, H, W]', v: 'f32[B, 3, W]'"


@pytest.mark.parametrize("graph, col, message", [
    ("y = warp(x, g)", 15, "warp: flow must be [B, 2, H, W] (horizontal and vertical displacements in pixels), "
                           "got f32[B, 3, H, W]"),
    ("y = warp(x, d)", 15, "warp: flow f64[B, 2, H, W] must have the dtype of x f32[B, 3, H, W]"),
    ("y = splat(v, f)", 13, "splat: expected x of layout [B, C, H, W] (rank 4), got f32[B, 3, W] (rank 3)"),
    ("y = splat(x, f[:, :, 1:])", 16, "splat: flow f32[B, 2, (H - 1), W] does not fit x f32[B, 3, H, W]: "
                                      "dimension 2 (H) is (H - 1) vs H"),
    ("y = splat(x, f, eps=0.0)", 19, "splat: eps must be positive, got 0.0"),
    ("y = correlation(x, g, radius=32)", 25, "correlation: radius must be in [0, 31] (a (2r + 1)^2 window), "
                                             "got 32"),
    ("y = correlation(x, f)", 22, "correlation: f2 f32[B, 2, H, W] must have the type of f1 f32[B, 3, H, W]"),
    ("y = splat(x, f, mode='max')", 19, "splat(): argument 'mode' must be one of 'sum', 'average', got 'max'"),
    ("y = correlation(v, v)", 19, "correlation: expected f1 of layout [B, C, H, W] (rank 4), got f32[B, 3, W]"),
])
def test_located_errors(graph, col, message):
    assert_error(spec(IO, graph), 6, col, message)
