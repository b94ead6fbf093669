"""specs/sla.yaml (SEEDS.md row 14, self-supervised label augmentation): the joint (class, rotation)
head over the four rotations of each image, aggregated inference and the self-distillation head,
against hand-written float64 references; the aggregation against a hand-written loop over rotations.

Weights: the seeded ones with batch-norm statistics and gains perturbed (so that no BN is an identity
that could hide a mistake), given to both the -O0 model and the -O1 one (BN folded into the convs).
Tolerances: the generated model in float64 vs the float64 references: max abs error <= 1e-10 at -O0
(same math, other float64 rounding), <= 1e-6 at -O1, whose BN-folded conv weights are computed in
float64 but stored in float32 (one rounding, ~6e-8 relative, on logits of order one); in float32:
<= 1e-4 (logits of order one, ~4 rounding steps per layer).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import specc
from conftest import SPECS

SPEC = SPECS / "sla.yaml"
F64_TOL = 1e-10
F64_FOLDED_TOL = 1e-6
F32_TOL = 1e-4
CLASSES, ROTATIONS, B = 10, 4, 3


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    base = specc.load(SPEC, opt_level=0).state_dict()
    gen = torch.Generator().manual_seed(7)
    out = {}
    for name, t in base.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            out[name] = 0.5 + torch.rand(t.shape, generator=gen)
        elif ".batch_norm" in name:  # running_mean, weight, bias
            out[name] = t + 0.3 * torch.randn(t.shape, generator=gen)
        else:
            out[name] = t.clone()
    return out


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# hand-written float64 references
# ---------------------------------------------------------------------------------------------

def bn(h, w, prefix):
    mean, var = w[prefix + ".running_mean"], w[prefix + ".running_var"]
    return (h - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * w[prefix + ".weight"][:, None, None] \
        + w[prefix + ".bias"][:, None, None]


def features(x, w):
    h = F.conv2d(x, w["f.conv2d.weight"], padding=1)
    h = F.max_pool2d(torch.relu(bn(h, w, "f.batch_norm")), 2)
    h = torch.relu(bn(F.conv2d(h, w["f.conv2d_1.weight"], padding=1), w, "f.batch_norm_1"))
    return h.mean(dim=(2, 3))


def joint_logits(x, w):
    """[B, classes, rotations]: the joint head's logit of (class c, rotation r) at [:, c, r]."""
    z = features(x, w) @ w["joint.weight"].T + w["joint.bias"]
    return z.reshape(x.shape[0], CLASSES, ROTATIONS)


def rotate(x, k):
    """k quarter turns of each [H, W] image, written out: turning once maps out[i, j] = x[j, W - 1 - i]."""
    for _ in range(k % 4):
        x = x.transpose(-1, -2).flip(-2)
    return x


def aggregated_loop(x, w):
    total = torch.zeros(x.shape[0], CLASSES, dtype=torch.float64)
    for k in range(ROTATIONS):
        total += joint_logits(rotate(x, k), w)[:, :, k]  # each class scored at the rotation the input has
    return total / ROTATIONS


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_level", [0, 1])
def test_aggregation_equals_a_hand_written_loop(weights, opt_level):
    model = specc.load(SPEC, opt_level=opt_level, weights=weights)
    w = {k: v.double() for k, v in weights.items()}
    x = images()
    with torch.no_grad():
        joint, aggregated, distilled = copy.deepcopy(model).double()(x)
        joint32, aggregated32, distilled32 = model(x.float())
    want = aggregated_loop(x, w)
    tol = F64_TOL if opt_level == 0 else F64_FOLDED_TOL
    assert aggregated.shape == (B, CLASSES)
    assert (aggregated - want).abs().max().item() <= tol
    assert (aggregated32.double() - want).abs().max().item() <= F32_TOL
    # joint rows k*B..(k+1)*B hold the images turned k times; class c at rotation r is column c * 4 + r
    for k in range(ROTATIONS):
        ref = joint_logits(rotate(x, k), w).reshape(B, CLASSES * ROTATIONS)
        assert (joint[k * B:(k + 1) * B] - ref).abs().max().item() <= tol
    want_distilled = features(x, w) @ w["distilled.weight"].T + w["distilled.bias"]
    assert (distilled - want_distilled).abs().max().item() <= tol
    assert (distilled32.double() - want_distilled).abs().max().item() <= F32_TOL


def test_deploy_drops_the_joint_output(zoo):
    s = specc.check(SPEC)
    assert [o.name for o in s.outputs] == ["joint", "aggregated", "distilled"]
    out = zoo.build_api("sla", deploy=True)
    _, model = zoo.load_dir(out)
    with torch.no_grad():
        got = model(torch.randn(2, 1, 8, 8))
    assert isinstance(got, tuple) and [t.shape for t in got] == [(2, CLASSES), (2, CLASSES)]


def test_cli_builds_and_runs(zoo):
    out = zoo.build_cli("sla", run=True)
    manifest = zoo.manifest(out)
    assert manifest["parameter_count"] == sum(t.numel() for t in zoo.weights(out).values())  # BN folded at -O1
    src = (out / "model.py").read_text()
    assert "torch.rot90(x, 1, (2, 3))" in src and "torch.rot90(x, 3, (2, 3))" in src
