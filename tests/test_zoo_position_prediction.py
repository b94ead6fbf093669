"""specs/position_prediction.yaml (SEEDS.md row 16): MP3's position prediction. A transformer without
positional embedding over the 16 2x2 patches of 8x8 digits predicts each patch's position; attention
takes keys and values only from the kept patches (the `keep` input, which the recipe draws afresh every
step: 4 of 16 patches, a new subset each step, the same ones again in a resumed run). After a short
`specc train` run the position accuracy on held-out images is far above chance (1/16), and it stays at
chance when the images carry no content; nothing in the architecture knows a position (permuting the
patches permutes the per-token outputs); the dropped patches' keys and values reach no other token; the
module equals a hand-written float64 reference.

Tolerances (float64 throughout): the module against the reference and the permutation check, max abs
error <= 1e-12 (summation order only; measured 6e-15 on logits up to 7 in size). Changing dropped
patches leaves every other token's logits bitwise equal (their attention weights are exactly 0).
Training: position_acc > 0.25 = 4x chance on the held-out 20% of the images after the recipe's 400 steps
(measured 0.35 with a new subset every step; the bound is about 0.79, since the blank patches of an
image are indistinguishable); on constant images every token gets the same logits, so the accuracy is
exactly 1/16.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import torch

import specc
from specc.train import data as D

NAME = "position_prediction"
TOL = 1e-12
SIDE, PATCH, D_MODEL, HEADS, LAYERS = 8, 2, 64, 4, 2
GRID = SIDE // PATCH
T = GRID * GRID
f64 = torch.float64


def load64(source, opt_level=1, **kw):
    return specc.load(source, opt_level=opt_level, **kw).double()


def to_patches(x):
    """[B, 1, 8, 8] -> [B, T, PATCH * PATCH]: the patches in row-major order, each row-major."""
    b = x.shape[0]
    return x.reshape(b, GRID, PATCH, GRID, PATCH).permute(0, 1, 3, 2, 4).reshape(b, T, PATCH * PATCH)


def from_patches(p):
    b = p.shape[0]
    return p.reshape(b, GRID, GRID, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(b, 1, SIDE, SIDE)


def inputs(seed=0, b=6, kept=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, SIDE, SIDE, generator=gen, dtype=f64)
    keep = torch.zeros(b, T, dtype=torch.bool)
    for i in range(b):
        keep[i, torch.randperm(T, generator=gen)[:kept]] = True
    return x, keep


def layer_norm(h, sd, name):
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    return (h - mu) / torch.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def lin(h, sd, name):
    return h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def reference(sd, x, keep):
    """MP3's encoder and position head written out by hand in float64: patch embedding as a matmul over
    the flattened patches, masked multi-head attention with keys/values of the kept patches only."""
    sd = {k: v.double() for k, v in sd.items()}
    b = x.shape[0]
    h = to_patches(x) @ sd["patches.weight"].reshape(D_MODEL, -1).T + sd["patches.bias"]  # no positions
    hd = D_MODEL // HEADS
    for i in range(LAYERS):
        p = f"h.{i}"
        a = layer_norm(h, sd, f"{p}.layer_norm")
        q, k, v = (lin(a, sd, f"{p}.attention.{n}").reshape(b, T, HEADS, hd).transpose(1, 2) for n in "qkv")
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)                        # [B, H, T(query), T(key)]
        s = s.masked_fill(~keep[:, None, None, :], -math.inf)              # only kept keys
        y = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, T, D_MODEL)
        h = h + lin(y, sd, f"{p}.attention.o")
        m = lin(layer_norm(h, sd, f"{p}.layer_norm_1"), sd, f"{p}.mlp.fc1")
        h = h + lin(0.5 * m * (1 + torch.erf(m / math.sqrt(2))), sd, f"{p}.mlp.fc2")
    return lin(layer_norm(h, sd, "layer_norm"), sd, "logits")


def perturbed(model, seed=3, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: v + scale * torch.randn(v.shape, generator=gen, dtype=f64)
                           for k, v in model.state_dict().items()})
    return model


def assert_matches_reference(model, seed=0, weights=None):
    """The module against the reference, with the module's own weights or (an optimised build whose
    parameters are fused) the unoptimised weights it was built from."""
    x, keep = inputs(seed)
    with torch.no_grad():
        got = model(x, keep)
    assert got.shape == (6, T, T) and got.dtype == f64
    assert (got - reference(model.state_dict() if weights is None else weights, x, keep)).abs().max() <= TOL


def test_module_equals_the_float64_reference(zoo):
    model = perturbed(load64(zoo.spec(NAME), opt_level=0))
    assert_matches_reference(model)
    weights = {k: v.float() for k, v in model.state_dict().items()}
    for opt_level in (1, 2):  # -O1: attention as scaled_dot_product_attention; -O2 also fuses q, k and v
        optimised = load64(zoo.spec(NAME), opt_level=opt_level, weights=weights)
        assert_matches_reference(optimised, seed=1, weights=weights)
    assert_matches_reference(load64(zoo.spec(NAME)), seed=2)


def permutation_error(model, seed=2):
    x, keep = inputs(seed)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(perm, torch.arange(T))
    xp = from_patches(to_patches(x)[:, perm])                   # patch j of xp is patch perm[j] of x
    assert torch.equal(to_patches(xp), to_patches(x)[:, perm])
    with torch.no_grad():
        y, yp = model(x, keep), model(xp, keep[:, perm])
    return (yp - y[:, perm]).abs().max().item()


def test_permuting_the_patches_permutes_the_outputs(zoo):
    """No positional information in the architecture: the same tokens in another order give the same
    per-token logits in that order (the logits' class axis, the positions, stays as it is)."""
    assert permutation_error(load64(zoo.spec(NAME))) <= TOL
    assert permutation_error(perturbed(load64(zoo.spec(NAME)), seed=4), seed=5) <= TOL
    # the check has teeth: a learned positional embedding (what MP3 leaves out) breaks it
    text = zoo.spec(NAME).read_text()
    old = "tokens = transpose(reshape(patches, B, d, -1), 1, 2)"
    assert text.count(old) == 1
    with_positions = text.replace(old, old + " + parameter(image * image / (patch * patch), d, init=normal(1.0))")
    assert permutation_error(load64(with_positions)) > 1e-3


def new_content(x, where, seed):
    """x with fresh random pixels in the patches where `where` [B, T] is true."""
    p = to_patches(x)
    fresh = torch.rand(p.shape, generator=torch.Generator().manual_seed(seed), dtype=f64)
    return from_patches(torch.where(where[:, :, None], fresh, p))


def test_keys_and_values_outside_the_kept_subset_reach_no_other_token(zoo):
    """A dropped patch is still a query, so its own logits read its content; no other token's do: new
    content in one dropped patch, or in all of them, leaves every other token's logits bitwise equal."""
    for model in (load64(zoo.spec(NAME)), perturbed(load64(zoo.spec(NAME)), seed=7)):
        x, keep = inputs(6)
        with torch.no_grad():
            y = model(x, keep)
            for j in torch.nonzero(~keep[0]).flatten().tolist():     # each dropped patch of the first image
                one = torch.zeros_like(keep)
                one[0, j] = True
                yj = model(new_content(x, one, seed=j), keep)
                assert torch.equal(yj[~one], y[~one]), j
                assert (yj[0, j] - y[0, j]).abs().max() > 1e-6, j  # its own row does change
            y_all = model(new_content(x, ~keep, seed=99), keep)     # every dropped patch of every image
        assert torch.equal(y_all[keep], y[keep])
        assert (y_all[~keep] - y[~keep]).abs().amax(-1).min() > 1e-6
    # the check has teeth: attention without the mask lets the dropped patches in
    text = zoo.spec(NAME).read_text()
    assert text.count("heads=heads, mask=mask)") == 1
    unmasked = load64(text.replace("heads=heads, mask=mask)", "heads=heads)"))
    with torch.no_grad():
        y, y_all = unmasked(x, keep), unmasked(new_content(x, ~keep, seed=99), keep)
    assert (y_all[keep] - y[keep]).abs().max() > 1e-3


def test_cli_check_and_build(zoo):
    proc = subprocess.run([sys.executable, "-m", "specc.cli", "check", str(zoo.spec(NAME)), "--no-color"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "f32[B, 16, 16]" in proc.stdout and "digit_patches (x, label, position, keep)" in proc.stdout
    for key, value, message in [
            ("data", "digit_patches(patch=3)", ":1:26: error: data: digit_patches(): 'patch' must divide"),
            ("data", "digit_patches(patch=4)", "cross_entropy: class targets [B, 4] must have the logits' shape "
                                               "without the class axis, [B, 16]"),
            ("random.keep", "subset(17)", ":1:19: error: random 'keep': k=17 is larger than the last axis (16 "
                                          "entries)"),
            ("random.keep", "uniform(0, 1)", "random 'keep': the input is bool[B, 16], and uniform() draws float "
                                             "values")]:
        bad = subprocess.run([sys.executable, "-m", "specc.cli", "check", str(zoo.spec(NAME)), "--no-color",
                              "--set", f"train.{key}={value}"], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stdout + bad.stderr, bad.stdout + bad.stderr
        assert "Traceback" not in bad.stdout + bad.stderr
    out = zoo.build_cli(NAME, run=True)
    _, model = zoo.load_dir(out)
    assert_matches_reference(model.double(), seed=3)


def _train(spec, run, until=None, resume=None, **train):
    from specc.train import train as run_recipe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_recipe(spec, run, train=train, until=until, resume=resume)
    finally:
        torch.set_num_threads(threads)


def test_the_kept_subset_is_drawn_afresh_every_step_and_again_on_resume(zoo, tmp_path, monkeypatch):
    """The recipe's `keep` (random: subset(ratio=0.25)): 4 of the 16 patches in every row, another
    choice at every step, and exactly the same choices in a run stopped and resumed as in one that was
    not (they depend on the seed and the step alone); the losses of the two runs agree step for step."""
    from specc.train import loop as L

    drawn: dict[str, dict[int, torch.Tensor]] = {}
    original = L.Stepper.draws
    which = {"run": ""}

    def record(self, step, scalars, n, rows=slice(None), fixed=False):
        out = original(self, step, scalars, n, rows, fixed)
        if not fixed:
            drawn.setdefault(which["run"], {})[step] = out["keep"].clone()
        return out

    monkeypatch.setattr(L.Stepper, "draws", record)
    short = {"steps": 6, "batch": 16, "checkpoint.every": 3, "eval.every": 6}
    which["run"] = "full"
    _train(zoo.spec(NAME), tmp_path / "full", **short)
    which["run"] = "part"
    assert _train(zoo.spec(NAME), tmp_path / "part", **short, until=3).stopped
    which["run"] = "resumed"
    _train(zoo.spec(NAME), tmp_path / "part", **short, resume=tmp_path / "part")
    full = drawn["full"]
    assert sorted(full) == list(range(6)) and sorted(drawn["part"]) == [0, 1, 2]
    assert sorted(drawn["resumed"]) == [3, 4, 5]
    for step, keep in full.items():
        assert keep.shape == (16, T) and keep.dtype == torch.bool
        assert torch.equal(keep.sum(-1), torch.full((16,), 4))              # mask ratio 0.75: 4 of 16 kept
        assert torch.equal((drawn["part"] if step < 3 else drawn["resumed"])[step], keep)
    assert all(not torch.equal(full[i], full[j]) for i in range(6) for j in range(i + 1, 6))
    assert (tmp_path / "part" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()


def test_position_accuracy_far_above_chance_after_a_short_run(zoo, tmp_path):
    run = _train(zoo.spec(NAME), tmp_path / "run")
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "val"]
    assert evals[0]["step"] == 0 and evals[0]["position_acc"] < 0.15  # untrained: near chance 1/16
    assert run.metrics["position_acc"] > 0.25                          # held-out images: 4x chance
    # the trained build equals the reference with its trained weights
    _, trained = zoo.load_dir(tmp_path / "run" / "model")
    assert_matches_reference(trained.double(), seed=4)


def test_without_content_the_position_stays_at_chance(zoo, tmp_path):
    """The same recipe on constant images (the positions of digit_patches, every pixel 0.5; the kept sets
    drawn by the recipe, the file's `keep` field unused): all tokens are equal, so every token of an
    image gets the same logits and exactly one of 16 is right."""
    gen = D.GENERATORS["digit_patches"]
    arrays = D.generate(gen, gen.bind({}), seed=0)
    np.savez(tmp_path / "constant.npz", x=np.full_like(arrays["x"], 0.5), position=arrays["position"],
             keep=arrays["keep"])
    text = zoo.spec(NAME).read_text()
    old = "data: digit_patches(patch=patch, mask_ratio=0.75)"
    assert text.count(old) == 1
    spec = tmp_path / "constant.yaml"
    spec.write_text(text.replace(old, 'data: {file: constant.npz, fields: {x: "f32[N, 1, 8, 8]", '
                                      'position: "i64[N, 16] in range(16)", keep: "bool[N, 16]"}}'))
    run = _train(spec, tmp_path / "run", steps=100, **{"eval.every": 100})
    assert abs(run.metrics["position_acc"] - 1 / T) <= 1e-6
