"""specs/splatflow.yaml (SEEDS.md row 25): summation splatting is the adjoint of bilinear backward warping,
<splat(x, flow), y> = <x, warp(y, flow)>, for the flows the built model estimates and for flows that push
pixels outside the image; the built module equals a hand-written float64 SplatFlow/RAFT-style estimator
(the refinement loop and the splatting step); the CLI checks and builds the spec.

The adjoint identity is checked with the generated model.py's own functions (`forward_splat`,
`backward_warp`) and with the built module's splatting output. The reference is independent of specc's
helpers: warping by torch's grid_sample (align_corners=True, zeros outside), the correlation by shifted
slices of a padded map, average splatting by a Python loop over source pixels and their four taps.

Tolerances (float64): the adjoint identity <= 1e-12 relative to |<splat(x, flow), y>| (both sides sum the
same products in different orders); the module against the reference <= 1e-10 max abs error (grid_sample
reaches each sampling point through the normalised grid, a few roundings away, and three refinement
steps carry that through convolutions; measured about 1e-14).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import specc

NAME = "splatflow"
ADJOINT_REL = 1e-12
TOL = 1e-10
FEAT, HIDDEN, RADIUS, ITERS, EPS = 16, 16, 2, 3, 1e-7
f64 = torch.float64


def images(seed=0, b=2, h=12, w=16):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, h, w, generator=gen, dtype=f64), torch.randn(b, 3, h, w, generator=gen, dtype=f64))


def lively(model, seed=1):
    """The model with seeded noise on every weight, the flow head's scaled up: flows of several pixels."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        noise = 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        state[k] = (v + noise) * (8.0 if ".delta." in k else 1.0)
    model.load_state_dict(state)
    return model


def load64(opt_level=0):
    return lively(specc.load(specc_path(), opt_level=opt_level).double())


def specc_path():
    from conftest import SPECS
    return SPECS / f"{NAME}.yaml"


# -- the hand-written reference -------------------------------------------------------------------

def warp_ref(x, flow):
    """grid_sample, align_corners=True, zeros outside, at (j + u, i + v) normalised to [-1, 1]."""
    _, _, h, w = x.shape
    gx = 2 * (torch.arange(w, dtype=f64).view(1, 1, w) + flow[:, 0]) / (w - 1) - 1
    gy = 2 * (torch.arange(h, dtype=f64).view(1, h, 1) + flow[:, 1]) / (h - 1) - 1
    return F.grid_sample(x, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="zeros",
                         align_corners=True)


def correlation_ref(f1, f2, r):
    _, _, h, w = f1.shape
    padded = F.pad(f2, (r, r, r, r))
    return torch.stack([(f1 * padded[:, :, r + dy:r + dy + h, r + dx:r + dx + w]).sum(1)
                        for dy in range(-r, r + 1) for dx in range(-r, r + 1)], dim=1)


def splat_average_ref(x, flow):
    """Each source pixel's value added with its bilinear weights to the pixels around its target, then
    divided by the summed weights + eps (a loop over source pixels and taps)."""
    b_, c_, h, w = x.shape
    out, weights = torch.zeros_like(x), torch.zeros(b_, 1, h, w, dtype=f64)
    for b in range(b_):
        for i in range(h):
            for j in range(w):
                px, py = j + flow[b, 0, i, j].item(), i + flow[b, 1, i, j].item()
                x0, y0 = math.floor(px), math.floor(py)
                for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                        if 0 <= yi < h and 0 <= xi < w:
                            out[b, :, yi, xi] += wy * wx * x[b, :, i, j]
                            weights[b, 0, yi, xi] += wy * wx
    return out / (weights + EPS)


def reference(sd, img1, img2):
    """SplatFlow's tiny RAFT-style estimator, written out in float64: encoder, context, ITERS refinement
    steps (lookup, motion encoder, ConvGRU, flow head), then average splatting of frame-1 features."""
    def conv(name, x):
        return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    f1, f2 = F.relu(conv("e1", img1)), F.relu(conv("e1", img2))  # one encoder for both frames
    context = conv("context", img1)
    h, ctx = torch.tanh(context[:, :HIDDEN]), F.relu(context[:, HIDDEN:])
    flow = torch.zeros(img1.shape[0], 2, *img1.shape[2:], dtype=f64)
    for i in range(ITERS):
        p = f"refine.{i}"
        corr = correlation_ref(f1, warp_ref(f2, flow), RADIUS) / math.sqrt(FEAT)
        x = torch.cat([F.relu(conv(f"{p}.motion", torch.cat([corr, flow], 1))), ctx], 1)
        hx = torch.cat([h, x], 1)
        z, r = torch.sigmoid(conv(f"{p}.convz", hx)), torch.sigmoid(conv(f"{p}.convr", hx))
        q = torch.tanh(conv(f"{p}.convq", torch.cat([r * h, x], 1)))
        h = (1 - z) * h + z * q
        flow = flow + conv(f"{p}.delta", F.relu(conv(f"{p}.head", h)))
    return flow, splat_average_ref(f1, flow)


# -- the tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_level", [0, 2])
def test_module_equals_the_float64_reference(opt_level):
    model = load64(opt_level)
    sd = {k: v for k, v in model.state_dict().items()}
    for seed in (0, 1):
        img1, img2 = images(seed)
        with torch.no_grad():
            flow, splatted = model(img1, img2)
        want_flow, want_splat = reference(sd, img1, img2)
        assert flow.abs().max() > 2.0  # flows of several pixels: taps cross pixels and the border
        assert (flow - want_flow).abs().max() <= TOL
        assert (splatted - want_splat).abs().max() <= TOL


def test_the_reference_check_has_teeth():
    """One refinement step fewer, or summation instead of average splatting, is caught."""
    model = load64()
    sd = dict(model.state_dict())
    img1, img2 = images(2)
    with torch.no_grad():
        flow, splatted = model(img1, img2)
    global ITERS
    ITERS, saved = ITERS - 1, ITERS
    try:
        short_flow, _ = reference(sd, img1, img2)
    finally:
        ITERS = saved
    assert (flow - short_flow).abs().max() > 1e-3
    summed = F.relu(F.conv2d(img1, sd["e1.weight"], sd["e1.bias"], padding=1))
    assert (splatted - specc_module_splat(summed, flow)).abs().max() > 1e-3


def specc_module_splat(x, flow):
    """Summation splatting through the adjoint: the gradient of <warp(y, flow), x> with respect to y."""
    y = torch.zeros_like(x, requires_grad=True)
    (grad,) = torch.autograd.grad((warp_ref(y, flow) * x).sum(), y)
    return grad


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from conftest import Zoo
    zoo = Zoo(tmp_path_factory)
    out = zoo.build_cli(NAME, run=True)
    module, model = zoo.load_dir(out)
    return module, lively(model.double())


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0, 100.0])
def test_splat_is_the_adjoint_of_warp(built, scale):
    """With the generated model.py's functions, on the flows the model estimates (up to 5 pixels; 23% of the
    pixels pushed outside the image), scaled (at 3, 60% outside; at 100 all)."""
    module, model = built
    img1, img2 = images(3)
    with torch.no_grad():
        flow, _ = model(img1, img2)
    flow = scale * flow
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        x, y = (torch.randn(2, 5, 12, 16, generator=gen, dtype=f64) for _ in range(2))
        lhs = (module.forward_splat(x, flow) * y).sum().item()
        rhs = (x * module.backward_warp(y, flow)).sum().item()
        if scale == 100.0:
            assert lhs == rhs == 0.0
        else:
            assert abs(lhs) > 1e-3
            assert abs(lhs - rhs) <= ADJOINT_REL * abs(lhs)
    px = torch.arange(16, dtype=f64) + flow[:, 0]
    py = torch.arange(12, dtype=f64).view(12, 1) + flow[:, 1]
    outside = ((px < 0) | (px > 15) | (py < 0) | (py > 11)).double().mean().item()
    assert outside > {0.5: 0.1, 1.0: 0.2, 3.0: 0.5, 100.0: 0.99}[scale]
    # and the warp is grid_sample's: an independent implementation of the same sampling
    assert (module.backward_warp(x, flow) - warp_ref(x, flow)).abs().max() <= TOL


def test_splat_of_ones_sums_the_weights_and_average_splatting_normalises(built):
    module, model = built
    img1, img2 = images(5)
    with torch.no_grad():
        flow, splatted = model(img1, img2)
    ones = torch.ones(2, 1, 12, 16, dtype=f64)
    weights = module.forward_splat(ones, flow)
    assert (weights - specc_module_splat(ones, flow)).abs().max() <= TOL
    f1 = F.relu(F.conv2d(img1, model.e1.weight, model.e1.bias, padding=1))
    summed = module.forward_splat(f1, flow)
    assert (splatted - summed / (weights + EPS)).abs().max() <= TOL


def test_cli_checks_and_builds():
    from conftest import REPO
    proc = subprocess.run([sys.executable, "-m", "specc.cli", "check", str(specc_path()), "--no-color"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "splatflow: ok" in proc.stdout and "f32[B, 2, H, W]" in proc.stdout
    s = specc.check(specc_path())
    assert [str(o.type) for o in s.outputs] == ["f32[B, 2, H, W]", f"f32[B, {FEAT}, H, W]"]
    # the encoder is shared by both frames: e2 holds no parameters of its own
    per_step = (2 + (2 * RADIUS + 1) ** 2) * HIDDEN * 9 + HIDDEN + 3 * (3 * HIDDEN * HIDDEN * 9 + HIDDEN) \
        + HIDDEN * HIDDEN * 9 + HIDDEN + HIDDEN * 2 * 9 + 2
    assert s.params == (3 * FEAT * 9 + FEAT) + (3 * 2 * HIDDEN * 9 + 2 * HIDDEN) + ITERS * per_step
