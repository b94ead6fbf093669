"""specs/splatflow.yaml (SEEDS.md row 25): summation splatting is the adjoint of bilinear backward warping,
<splat(x, flow), y> = <x, warp(y, flow)>, for the flows the built model estimates and for flows that push
pixels outside the image; the built module equals a hand-written float64 SplatFlow/RAFT-style estimator
(the refinement loop with one set of update weights, as RAFT ties them, or one per step with tied=false;
every step's flow; the splatting step); the CLI checks and builds the spec; its recipe's loss is RAFT's
sequence loss, and a short `specc train` brings the end-point error far below the zero-flow baseline.

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
FEAT, HIDDEN, RADIUS, ITERS, EPS, GAMMA = 16, 16, 2, 3, 1e-7, 0.8
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


def load64(opt_level=0, **params):
    return lively(specc.load(specc_path(), opt_level=opt_level, **params).double())


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


def reference(sd, img1, img2, tied=True):
    """SplatFlow's tiny RAFT-style estimator, written out in float64: encoder, context, ITERS refinement
    steps (lookup, motion encoder, ConvGRU, flow head; tied: every step with the first step's weights, as
    RAFT's update block), then average splatting of frame-1 features. Returns the last flow, the splatted
    features and the list of every step's flow."""
    def conv(name, x):
        return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    f1, f2 = F.relu(conv("e1", img1)), F.relu(conv("e1", img2))  # one encoder for both frames
    context = conv("context", img1)
    h, ctx = torch.tanh(context[:, :HIDDEN]), F.relu(context[:, HIDDEN:])
    flow = torch.zeros(img1.shape[0], 2, *img1.shape[2:], dtype=f64)
    flows = []
    for i in range(ITERS):
        p = "refine.0" if tied else f"refine.{i}"
        corr = correlation_ref(f1, warp_ref(f2, flow), RADIUS) / math.sqrt(FEAT)
        x = torch.cat([F.relu(conv(f"{p}.motion", torch.cat([corr, flow], 1))), ctx], 1)
        hx = torch.cat([h, x], 1)
        z, r = torch.sigmoid(conv(f"{p}.convz", hx)), torch.sigmoid(conv(f"{p}.convr", hx))
        q = torch.tanh(conv(f"{p}.convq", torch.cat([r * h, x], 1)))
        h = (1 - z) * h + z * q
        flow = flow + conv(f"{p}.delta", F.relu(conv(f"{p}.head", h)))
        flows.append(flow)
    return flow, splat_average_ref(f1, flow), flows


# -- the tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_level, tied", [(0, True), (2, True), (0, False)])
def test_module_equals_the_float64_reference(opt_level, tied):
    model = load64(opt_level, tied=tied)
    sd = {k: v for k, v in model.state_dict().items()}
    for seed in (0, 1):
        img1, img2 = images(seed)
        with torch.no_grad():
            flow, splatted, flows, step_weights = model(img1, img2)
        want_flow, want_splat, want_flows = reference(sd, img1, img2, tied)
        assert flow.abs().max() > 2.0  # flows of several pixels: taps cross pixels and the border
        assert (flow - want_flow).abs().max() <= TOL
        assert (splatted - want_splat).abs().max() <= TOL
        assert flows.shape == (ITERS, 2, 2, 12, 16) and torch.equal(flows[-1], flow)
        for got, want in zip(flows, want_flows):
            assert (got - want).abs().max() <= TOL
        assert torch.equal(step_weights, torch.tensor([GAMMA ** (ITERS - 1 - i) for i in range(ITERS)], dtype=f64))


def test_the_reference_check_has_teeth():
    """One refinement step fewer, untied weights for a tied model, or summation instead of average splatting,
    is caught."""
    model = load64()
    sd = dict(model.state_dict())
    img1, img2 = images(2)
    with torch.no_grad():
        flow, splatted, _, _ = model(img1, img2)
    global ITERS
    ITERS, saved = ITERS - 1, ITERS
    try:
        short_flow, _, _ = reference(sd, img1, img2)
    finally:
        ITERS = saved
    assert (flow - short_flow).abs().max() > 1e-3
    untied = load64(tied=False)  # other weights for steps 1 and 2: the tied reference does not follow them
    with torch.no_grad():
        flow_untied = untied(img1, img2)[0]
    assert (flow_untied - reference(dict(untied.state_dict()), img1, img2, tied=True)[0]).abs().max() > 1e-3
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


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0, 1e4])
def test_splat_is_the_adjoint_of_warp(built, scale):
    """With the generated model.py's functions, on the flows the model estimates (0.001 to 10 pixels; 38% of
    the pixels pushed outside the image), scaled (at 3, 77% outside; at 1e4 all)."""
    module, model = built
    img1, img2 = images(3)
    with torch.no_grad():
        flow = model(img1, img2)[0]
    flow = scale * flow
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        x, y = (torch.randn(2, 5, 12, 16, generator=gen, dtype=f64) for _ in range(2))
        lhs = (module.forward_splat(x, flow) * y).sum().item()
        rhs = (x * module.backward_warp(y, flow)).sum().item()
        if scale == 1e4:
            assert lhs == rhs == 0.0
        else:
            assert abs(lhs) > 1e-3
            assert abs(lhs - rhs) <= ADJOINT_REL * abs(lhs)
    px = torch.arange(16, dtype=f64) + flow[:, 0]
    py = torch.arange(12, dtype=f64).view(12, 1) + flow[:, 1]
    outside = ((px < 0) | (px > 15) | (py < 0) | (py > 11)).double().mean().item()
    assert outside > {0.5: 0.1, 1.0: 0.3, 3.0: 0.7, 1e4: 0.99}[scale]
    # and the warp is grid_sample's: an independent implementation of the same sampling
    assert (module.backward_warp(x, flow) - warp_ref(x, flow)).abs().max() <= TOL


def test_splat_of_ones_sums_the_weights_and_average_splatting_normalises(built):
    module, model = built
    img1, img2 = images(5)
    with torch.no_grad():
        flow, splatted = model(img1, img2)[:2]
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
    assert [str(o.type) for o in s.outputs] == ["f32[B, 2, H, W]", f"f32[B, {FEAT}, H, W]",
                                                 f"f32[{ITERS}, B, 2, H, W]", f"f32[{ITERS}]"]
    # the encoder is shared by both frames: e2 holds no parameters of its own; the update weights are tied
    # across the refinement steps (one set), or one set per step with tied=false
    per_step = (2 + (2 * RADIUS + 1) ** 2) * HIDDEN * 9 + HIDDEN + 3 * (3 * HIDDEN * HIDDEN * 9 + HIDDEN) \
        + HIDDEN * HIDDEN * 9 + HIDDEN + HIDDEN * 2 * 9 + 2
    encoders = (3 * FEAT * 9 + FEAT) + (3 * 2 * HIDDEN * 9 + 2 * HIDDEN)
    assert s.params == encoders + per_step
    assert specc.check(specc_path(), tied=False).params == encoders + ITERS * per_step
    model = specc.load(specc_path())
    assert sum(p.numel() for p in model.parameters()) == encoders + per_step  # one set in the torch module
    assert model.refine[2].convq.weight is model.refine[0].convq.weight
    assert "deploy      without flows, step_weights (training only)" in proc.stdout  # the per-step flows are training-only


# -- training: RAFT's sequence loss on flow_pairs(), end-point error against the zero-flow baseline -------

def test_the_recipe_loss_is_raft_sequence_loss():
    """The recipe's loss on one batch equals sum_i GAMMA^(ITERS-1-i) * mean |flow_i - flow_gt| written out,
    and the metrics are the end-point errors of the last flow and of zero flow."""
    from specc.train import prepare
    from specc.train.data import GENERATORS, generate
    from specc.train.expr import TENSOR_FUNCTIONS, evaluate
    src, graph, recipe = prepare(str(specc_path()))
    gen = GENERATORS["flow_pairs"]
    batch = {k: torch.from_numpy(v) for k, v in generate(gen, gen.bind({"n": 4, "height": 12, "width": 12}), 0).items()}
    model = specc.load(specc_path())
    with torch.no_grad():
        flow, splatted, flows, step_weights = model(batch["img1"], batch["img2"])
    env = {**recipe.params, **batch, "flow": flow, "splatted": splatted, "flows": flows, "step_weights": step_weights}
    loss = evaluate(recipe.loss, env, TENSOR_FUNCTIONS, recipe.sources)
    gt = batch["flow_gt"].double()
    want = sum(GAMMA ** (ITERS - 1 - i) * (flows[i].double() - gt).abs().mean() for i in range(ITERS))
    assert abs(loss.item() - want.item()) <= 1e-6 * want.item()
    assert abs(loss.item() - (flows[-1].double() - gt).abs().mean().item()) > 1e-3  # not the last step's alone
    epe = evaluate(recipe.metrics["epe"], env, TENSOR_FUNCTIONS, recipe.sources)
    assert abs(epe.item() - (flow.double() - gt).norm(dim=1).mean().item()) <= 1e-6
    zero = evaluate(recipe.metrics["epe_zero"], env, TENSOR_FUNCTIONS, recipe.sources)
    assert abs(zero.item() - gt.norm(dim=1).mean().item()) <= 1e-6


def test_a_short_run_brings_the_end_point_error_far_below_zero_flow(tmp_path):
    """`specc train` with the spec's recipe (one thread, a few seconds): the validation end-point error
    starts near the zero-flow baseline and ends below half of it."""
    import json
    from conftest import REPO
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "specc.cli", "train", str(specc_path()), "-o", str(run),
                           "--threads", "1", "--no-color"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "val"]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 300
    assert first["epe"] > 0.8 * first["epe_zero"]  # the untrained model: about zero flow
    assert last["epe"] < 0.5 * last["epe_zero"], last
    assert last["loss"] < 0.5 * first["loss"]
    assert (run / "model" / "model.py").is_file()
